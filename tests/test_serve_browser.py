"""``psal serve``'s page in a real headless browser: open a picture, paint a mask, run inpaint,
download the result; its pixels outside the stroke must be the picture's.

Drives the system's Chromium (Debian's ``chromium``; ``.ci/run`` installs it) with playwright for
Python, without playwright's own browser downloads. Skips, saying why, when either is missing.
Set ``PSAL_SCREENSHOT=path.png`` to keep the screenshot of the page with the result shown.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("starlette", reason="psal serve needs the serve extra: pip install 'psal[serve]'")
pytest.importorskip("uvicorn", reason="psal serve needs the serve extra: pip install 'psal[serve]'")
pytest.importorskip("python_multipart", reason="psal serve needs the serve extra: pip install 'psal[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright for Python (the test extra)")
Image = pytest.importorskip("PIL.Image")

from psal.serve import BackgroundServer  # noqa: E402
from psal.serve.app import create_app  # noqa: E402

CHROMIUM = os.environ.get("PSAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

# The picture and the strokes, in picture pixels: the first stroke (over the astronaut's space
# shuttle) is inpainted, the second is undone with Ctrl+Z before running (so its pixels must come
# back unchanged too).
SIZE = 160
_S = SIZE / 96  # the strokes were laid out on a 96-pixel picture
BRUSH = round(16 * _S)
STROKE = ((78 * _S, 2 * _S), (79 * _S, 58 * _S))
UNDONE = ((15 * _S, 80 * _S), (60 * _S, 78 * _S))


def _picture() -> np.ndarray:
    """A photograph (scikit-image's astronaut) at SIZE x SIZE, or a synthetic one without it."""
    try:
        from skimage import data

        return np.asarray(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.LANCZOS))
    except ImportError:
        y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
        rgb = np.stack([np.sin(9 * x) * 0.5 + 0.5, y, np.cos(7 * x * y) * 0.5 + 0.5], -1)
        return (rgb * 255).astype(np.uint8)


def _distance_to_segment(a, b) -> np.ndarray:
    """``(SIZE, SIZE)``: the distance of each pixel centre to the segment from ``a`` to ``b``
    (``(x, y)`` in picture pixels, as the page's mouse events give them)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xx - (ax + t * dx), yy - (ay + t * dy))


def _drag(page, box, zoom, a, b):
    """A mouse stroke on the mask canvas from picture point ``a`` to ``b``."""
    page.mouse.move(box["x"] + a[0] * zoom, box["y"] + a[1] * zoom)
    page.mouse.down()
    page.mouse.move(box["x"] + b[0] * zoom, box["y"] + b[1] * zoom, steps=12)
    page.mouse.up()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; or set PSAL_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} does not start under playwright: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()


def test_paint_inpaint_and_download_in_the_page(browser, tmp_path):
    picture = _picture()
    Image.fromarray(picture).save(tmp_path / "astronaut.png")
    with BackgroundServer(create_app("cpu")) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 760}, accept_downloads=True)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        fetched = []  # every URL the page loads: all from this server (no CDN, works offline)
        page.on("request", lambda request: fetched.append(request.url))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('server').textContent.includes('cpu')")
        page.set_input_files("#file", str(tmp_path / "astronaut.png"))
        page.wait_for_selector("#editor:not([hidden])")
        assert page.is_disabled("#run")  # nothing painted yet
        page.evaluate("size => { const b = document.getElementById('brush'); b.value = size; b.dispatchEvent(new Event('input')); }", BRUSH)

        box = page.locator("#mask").bounding_box()
        zoom = box["width"] / SIZE
        assert zoom > 2 and abs(box["height"] / SIZE - zoom) < 0.01  # small pictures are shown enlarged
        _drag(page, box, zoom, *STROKE)
        _drag(page, box, zoom, *UNDONE)
        assert page.evaluate("state.strokes.length") == 2
        page.keyboard.press("Control+z")
        assert page.evaluate("state.strokes.length") == 1

        page.click("#run")
        page.wait_for_selector("#download:not([hidden])", timeout=90_000)
        assert "Done" in page.text_content("#status")
        assert page.is_visible("#compare") and page.is_visible("#split")
        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename == "astronaut_inpaint.png"
        download.value.save_as(tmp_path / "result.png")

        screenshot = page.screenshot()
        assert not errors, errors
        assert fetched and all(u.startswith((server.url + "/", "blob:", "data:")) for u in fetched), fetched
        page.close()
    target = os.environ.get("PSAL_SCREENSHOT")
    if target:
        with open(target, "wb") as f:
            f.write(screenshot)
    assert Image.open(io.BytesIO(screenshot)).size == (1280, 760)

    result = np.asarray(Image.open(tmp_path / "result.png"))
    assert result.shape == picture.shape
    near = _distance_to_segment(*STROKE)
    outside = near > BRUSH / 2 + 1.5  # clear of the stroke and of its anti-aliased edge
    assert np.array_equal(result[outside], picture[outside])  # the undone stroke included
    inside = near < BRUSH / 2 - 1
    assert (result[inside] != picture[inside]).any(axis=-1).mean() > 0.5  # the stroke was filled anew
