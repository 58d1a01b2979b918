"""``psal serve``: the HTTP API through a real server on a local port, against the command line.

The server runs in a thread of the test process (uvicorn, 127.0.0.1, a free port), on the CPU,
with a small ``max_pixels`` so that the 413 cases need only small pictures. Its results must be
the bytes that ``psal inpaint/upscale/colorize/reconstruct ... --seed S`` writes.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="psal serve needs the serve extra: pip install 'psal[serve]'")
pytest.importorskip("uvicorn", reason="psal serve needs the serve extra: pip install 'psal[serve]'")
pytest.importorskip("python_multipart", reason="psal serve needs the serve extra: pip install 'psal[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests of psal serve need httpx")
Image = pytest.importorskip("PIL.Image")

import psal  # noqa: E402
from psal.cli.main import main  # noqa: E402
from psal.serve import BackgroundServer  # noqa: E402
from psal.serve.app import create_app  # noqa: E402
from psal.serve.jobs import BusyError, JobInUseError, JobQueue, StoppingError  # noqa: E402

# Pictures of more pixels (and upscaled results) are refused: 80 x 80 is over, 32 x 32 x 4 too.
MAX_PIXELS = 12000


def _rgb(seed: int, size=(32, 32)) -> np.ndarray:
    """A smooth random colour picture with some noise, uint8 ``(H, W, 3)``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 5, 5, generator=g)
    big = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False)
    big = (big + 0.05 * torch.randn(big.shape, generator=g)).clamp(0, 1)
    return (big[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _box_mask(size=(32, 32), box=(slice(10, 18), slice(12, 22))) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[box] = 255
    return mask


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def server():
    app = create_app("cpu", max_pixels=MAX_PIXELS)
    with BackgroundServer(app) as running:
        with httpx.Client(base_url=running.url, timeout=120) as client:
            yield client, app


@pytest.fixture(scope="module")
def inpaint_case(tmp_path_factory):
    """A picture, a mask and what ``psal inpaint --seed 3`` writes for them."""
    tmp = tmp_path_factory.mktemp("inpaint")
    picture, mask = _rgb(0), _box_mask()
    Image.fromarray(picture).save(tmp / "image.png")
    Image.fromarray(mask).save(tmp / "mask.png")
    out = tmp / "out.png"
    assert (
        main(["inpaint", str(tmp / "image.png"), str(tmp / "mask.png"), "-o", str(out), "--seed", "3", "--device", "cpu", "--quiet"]) == 0
    )
    return {
        "image": (tmp / "image.png").read_bytes(),
        "mask": (tmp / "mask.png").read_bytes(),
        "cli": out.read_bytes(),
        "picture": picture,
        "hole": mask > 0,
    }


def _post(client, task, files, data=None):
    return client.post(f"/api/{task}", files={k: (f"{k}.png", v) for k, v in files.items()}, data=data or {})


def test_health_and_the_page_work_offline(server):
    client, _ = server
    health = client.get("/api/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": psal.__version__, "device": "cpu", "max_pixels": MAX_PIXELS}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and "/static/app.js" in page.text and "/static/style.css" in page.text
    texts = [page.text]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        got = client.get(f"/static/{name}")
        assert got.status_code == 200 and kind in got.headers["content-type"]
        texts.append(got.text)
    for text in texts:  # nothing loaded from elsewhere: the page works offline
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), re.search(
            r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I
        )


def _cases(tmp):
    """``(task, files, fields, command line, check)`` for each task, with the files written."""
    g = _rgb(1, (24, 20))
    Image.fromarray(g).save(tmp / "small.png")
    Image.fromarray(_rgb(2, (30, 26))).save(tmp / "other.png")
    Image.fromarray(g).convert("L").save(tmp / "gray.png")
    deep = _rgb(3)[..., 0].astype(np.uint16) * 256 + 8 * np.arange(32, dtype=np.uint16)  # 16 bits of detail
    Image.fromarray(deep).save(tmp / "deep.png")
    Image.fromarray(_box_mask()).save(tmp / "mask.png")

    def shape(expected):
        return lambda got: got.shape == expected

    def keeps_known(got):  # 16 bits kept, and the pixels outside the mask exactly
        known = _box_mask() == 0
        return got.dtype == np.uint16 and np.array_equal(got[known], deep[known]) and not np.array_equal(got, deep)

    return [
        ("inpaint", {"image": "deep.png", "mask": "mask.png"}, {"seed": "7"}, ["inpaint", "deep.png", "mask.png", "--seed", "7"], keeps_known),
        ("upscale", {"image": "small.png"}, {"scale": "2", "method": "patch", "seed": "1"},
         ["upscale", "small.png", "--scale", "2", "--method", "patch", "--seed", "1"], shape((48, 40, 3))),
        ("upscale", {"image": "small.png"}, {"scale": "3", "steps": "2", "seed": "2"},
         ["upscale", "small.png", "--scale", "3", "--steps", "2", "--seed", "2"], shape((72, 60, 3))),
        ("colorize", {"image": "gray.png", "reference": "other.png"}, {"seed": "4"},
         ["colorize", "gray.png", "other.png", "--seed", "4"], shape((24, 20, 3))),
        ("reconstruct", {"image": "small.png", "source": "other.png"}, {},
         ["reconstruct", "small.png", "other.png"], shape((24, 20, 3))),
    ]  # fmt: skip


def test_every_task_gives_the_command_lines_bytes(server, tmp_path, monkeypatch):
    client, _ = server
    monkeypatch.chdir(tmp_path)
    for task, files, fields, argv, check in _cases(tmp_path):
        out = tmp_path / f"cli_{task}.png"
        assert main([*argv, "-o", str(out), "--device", "cpu", "--quiet"]) == 0, argv
        got = _post(client, task, {k: (tmp_path / v).read_bytes() for k, v in files.items()}, fields)
        assert got.status_code == 200, (task, got.text)
        assert got.headers["content-type"] == "image/png"
        assert got.content == out.read_bytes(), f"{task}: the server's PNG differs from psal {' '.join(argv)}"
        assert check(_pixels(got.content)), task


def test_inpaint_keeps_the_pixels_outside_the_mask(server, inpaint_case):
    client, _ = server
    got = _post(client, "inpaint", {"image": inpaint_case["image"], "mask": inpaint_case["mask"]}, {"seed": "3"})
    assert got.status_code == 200 and got.content == inpaint_case["cli"]
    result, picture, hole = _pixels(got.content), inpaint_case["picture"], inpaint_case["hole"]
    assert np.array_equal(result[~hole], picture[~hole])
    assert not np.array_equal(result[hole], picture[hole])


def test_concurrent_requests_wait_and_run_one_at_a_time(server, inpaint_case, monkeypatch):
    """Ten requests at once, queued behind a job that holds the worker: all answered with the
    command line's bytes, never two jobs running together, each job's progress visible."""
    client, app = server
    jobs = app.state.jobs
    # Counted where the work happens, not by the queue: how many inpaintings run at once.
    from psal import tasks

    real, lock, active = tasks.inpaint_image, threading.Lock(), {"now": 0, "max": 0}

    def counted(*args, **kwargs):
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        try:
            time.sleep(0.02)  # long enough for a second worker, were there one, to overlap
            return real(*args, **kwargs)
        finally:
            with lock:
                active["now"] -= 1

    monkeypatch.setattr(tasks, "inpaint_image", counted)
    gate = threading.Event()
    jobs.submit(lambda progress: gate.wait(60), "gate")
    before = jobs.stats()

    def request(i):
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            return _post(own, "inpaint", {"image": inpaint_case["image"], "mask": inpaint_case["mask"]}, {"seed": "3", "job": f"c{i}"})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = [pool.submit(request, i) for i in range(10)]
        deadline = time.monotonic() + 60
        while jobs.stats()["waiting"] < 10:  # all ten in the queue at the same time
            assert time.monotonic() < deadline, jobs.stats()
            assert not any(a.done() for a in answers), [a.result().text for a in answers if a.done()]
            time.sleep(0.02)
        waiting = client.get("/api/jobs/c3").json()
        assert waiting["state"] == "queued" and waiting["ahead"] >= 1  # the gate runs before it
        gate.set()
        answers = [a.result() for a in answers]
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers if a.status_code != 200]
    assert all(a.content == inpaint_case["cli"] for a in answers)
    stats = jobs.stats()
    assert stats["max_running"] == 1 and stats["max_waiting"] >= 10
    assert active["max"] == 1  # never two at once
    assert stats["finished"] == before["finished"] + 11 and stats["running"] == stats["waiting"] == 0
    for i in range(10):
        status = client.get(f"/api/jobs/c{i}").json()
        assert status["state"] == "done" and status["done"] == status["total"] > 1  # progress was reported
    assert client.get("/api/jobs/nobody").status_code == 404


def test_a_client_that_goes_away_cancels_its_job(server, inpaint_case):
    """A request whose client disconnects: its job never starts if it was waiting, or stops at its
    next progress report if it was running, so that the queue does not work for nobody."""
    client, app = server
    jobs = app.state.jobs
    gate = threading.Event()
    jobs.submit(lambda progress: gate.wait(60), "gate-2")
    url = httpx.URL(str(client.base_url))

    def send(path, files, data):  # a whole request on a raw socket, left unread
        req = httpx.Request("POST", url.join(path), files={k: (f"{k}.png", v) for k, v in files.items()}, data=data)
        head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
        sock = socket.create_connection((url.host, url.port))
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + req.read())
        return sock

    def state(job, want, done=0):
        deadline = time.monotonic() + 20
        while (got := client.get(f"/api/jobs/{job}").json()).get("state") != want or got["done"] < done:  # 404 until queued
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        return got

    long = send("/api/upscale", {"image": inpaint_case["image"]}, {"scale": "2", "steps": "100000", "job": "gone-running"})
    waiting = send("/api/inpaint", {"image": inpaint_case["image"], "mask": inpaint_case["mask"]}, {"job": "gone-waiting"})
    state("gone-waiting", "queued")
    waiting.close()
    state("gone-waiting", "cancelled")  # while the gate still holds the worker
    gate.set()
    assert state("gone-running", "running", done=1)["total"] == 100_000
    long.close()
    assert state("gone-running", "cancelled")["done"] < 100_000  # stopped part way
    deadline = time.monotonic() + 20
    while jobs.stats()["running"] or jobs.stats()["waiting"]:
        assert time.monotonic() < deadline, jobs.stats()
        time.sleep(0.05)
    answer = _post(client, "inpaint", {"image": inpaint_case["image"], "mask": inpaint_case["mask"]}, {"seed": "3"})
    assert answer.status_code == 200 and answer.content == inpaint_case["cli"]  # the queue goes on


def _bad_inputs():
    picture, mask = _rgb(0), _box_mask()
    image, good_mask = _png(picture), _png(mask)
    clear = np.concatenate([picture, np.full((32, 32, 1), 255, np.uint8)], 2)
    clear[0, 0, 3] = 0
    gray = _png(picture[..., 0])
    return [
        ("inpaint", {"image": b"not a picture", "mask": good_mask}, {}, 400, "image: not a readable image"),
        ("inpaint", {"image": image, "mask": b"GIF89a broken"}, {}, 400, "mask: not a readable image"),
        ("inpaint", {"image": b"", "mask": good_mask}, {}, 400, "image: empty file"),
        ("inpaint", {"image": image, "mask": _png(_box_mask((16, 16), (slice(2, 5), slice(2, 5))))}, {}, 400, "must be the same size"),
        ("inpaint", {"image": image, "mask": _png(np.zeros((32, 32), np.uint8))}, {}, 400, "no white pixel"),
        ("inpaint", {"image": image, "mask": _png(np.full((32, 32), 255, np.uint8))}, {}, 400, "white everywhere"),
        ("inpaint", {"image": _png(clear), "mask": good_mask}, {}, 400, "transparent pixels"),
        ("inpaint", {"image": image}, {}, 400, "missing field 'mask'"),
        ("inpaint", {"image": image, "mask": good_mask}, {"seed": "-1"}, 400, "seed must be an integer"),
        ("inpaint", {"image": image, "mask": good_mask}, {"seed": "1.5"}, 400, "seed must be an integer"),
        ("inpaint", {"image": image, "mask": good_mask}, {"colour": "red"}, 400, "unknown field 'colour'"),
        ("inpaint", {"image": image, "mask": good_mask}, {"job": "../etc"}, 400, "field 'job'"),
        ("upscale", {"image": image}, {}, 400, "missing field 'scale'"),
        ("upscale", {"image": image}, {"scale": "5"}, 400, "scale must be one of 2, 3, 4, got '5'"),
        ("upscale", {"image": image}, {"scale": "two"}, 400, "scale must be one of"),
        ("upscale", {"image": image}, {"scale": "2", "method": "magic"}, 400, "method must be one of network, patch"),
        ("upscale", {"image": image}, {"scale": "2", "steps": "0"}, 400, "steps must be an integer"),
        ("colorize", {"image": image, "reference": gray}, {}, 400, "reference is grayscale"),
        ("colorize", {"image": image}, {}, 400, "missing field 'reference'"),
        ("reconstruct", {"image": image}, {}, 400, "missing field 'source'"),
        (
            "inpaint",
            {"image": _png(_rgb(5, (120, 120))), "mask": _png(_box_mask((120, 120)))},
            {},
            413,
            "14400 pixels, more than the 12000 allowed",
        ),
        (
            "upscale",
            {"image": _png(_rgb(5, (40, 40)))},
            {"scale": "4"},
            413,
            "enlarged 4x by the network method needs the memory of 64000 pixels",
        ),
        ("colorize", {"image": image, "reference": _png(_rgb(5, (100, 130)))}, {}, 413, "reference: 130x100"),
    ]


def _one_line_error(response, status, text):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body
    assert text in body["error"], body


def test_bad_requests_get_one_line_and_start_no_job(server):
    """Every bad input: the right 4xx and one line, decided before any job starts (413 too)."""
    client, app = server
    submitted = app.state.jobs.stats()["submitted"]
    for task, files, fields, status, text in _bad_inputs():
        _one_line_error(_post(client, task, files, fields), status, text)
    _one_line_error(client.post("/api/inpaint", json={"image": "x"}), 415, "multipart/form-data")
    _one_line_error(
        client.post("/api/inpaint", data={"image": "abc", "mask": "def"}, files={"seed": ("s", b"1")}), 400, "must be a file upload"
    )
    _one_line_error(client.get("/api/inpaint"), 405, "Method Not Allowed")
    _one_line_error(client.get("/api/nothing"), 404, "Not Found")
    assert app.state.jobs.stats()["submitted"] == submitted  # none of them reached the queue
    assert client.get("/api/health").json()["status"] == "ok"


def test_job_queue_limits_and_failures():
    jobs = JobQueue(max_waiting=1)
    gate = threading.Event()
    _, held = jobs.submit(lambda progress: gate.wait(30), "held")
    deadline = time.monotonic() + 10
    while jobs.status("held")["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _, failing = jobs.submit(lambda progress: 1 / 0, "failing")
    with pytest.raises(BusyError, match="1 jobs are waiting"):
        jobs.submit(lambda progress: None)
    with pytest.raises(BusyError, match="1 jobs are waiting"):
        jobs.check_room()  # asked before decoding
    with pytest.raises(JobInUseError, match="'held'"):
        jobs.submit(lambda progress: None, "held")
    gate.set()
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    assert held.result(timeout=10) is True
    assert jobs.status("failing")["state"] == "failed" and jobs.status("held")["state"] == "done"
    _, again = jobs.submit(lambda progress: progress(2, 2) or "ok", "held")  # a finished id may be reused
    assert again.result(timeout=10) == "ok" and jobs.status("held")["done"] == 2
    assert jobs.stats()["max_running"] == 1
    jobs.check_room()  # room again
    jobs.close()
    with pytest.raises(StoppingError):
        jobs.check_room()
    with pytest.raises(ValueError, match="max_waiting"):
        JobQueue(max_waiting=0)


def test_closing_the_queue_stops_the_running_job_and_fails_the_waiting_ones():
    """What stopping the server does: no waiting for a long job (it stops at its next progress
    report), the waiting jobs never start, new ones are refused."""
    jobs = JobQueue()
    started, ran = threading.Event(), []

    def long(progress):
        started.set()
        for i in range(3000):
            progress(i, 3000)
            time.sleep(0.01)

    _, running = jobs.submit(long, "long")
    _, waiting = jobs.submit(lambda progress: ran.append(1), "next")
    assert started.wait(10)
    t0 = time.monotonic()
    jobs.close()
    for future in (running, waiting):
        with pytest.raises(StoppingError, match="stopping"):
            future.result(timeout=10)
    assert jobs.join(timeout=10) and time.monotonic() - t0 < 5
    assert jobs.status("long")["state"] == "failed" and not ran
    with pytest.raises(StoppingError):
        jobs.submit(lambda progress: None)


def test_psal_serve_command_serves_until_ctrl_c():
    """The console command in its own process: the address on stderr, the API there, Ctrl+C ends it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "psal.cli", "serve", "--port", "0", "--device", "cpu", "--max-pixels", "1234"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, line
        health = httpx.get(f"http://127.0.0.1:{found.group(1)}/api/health", timeout=30).json()
        assert health == {"status": "ok", "version": psal.__version__, "device": "cpu", "max_pixels": 1234}
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert rest.strip() == "psal serve: stopped", rest


def test_psal_serve_refuses_in_one_line(capsys):
    def bad(argv, text):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        bad(["serve", "--port", str(taken.getsockname()[1]), "--device", "cpu"], "cannot listen on 127.0.0.1")
    bad(["serve", "--max-pixels", "0", "--device", "cpu"], "--max-pixels must be at least 1")
    bad(["serve", "--port", "70000", "--device", "cpu"], "--port must be from 0 to 65535")
    if not torch.cuda.is_available():
        bad(["serve", "--device", "cuda"], "no CUDA device")


def test_without_the_serve_extra_psal_imports_and_serve_says_what_to_install():
    code = (
        "import sys\n"
        "for name in ('starlette', 'uvicorn', 'python_multipart', 'multipart'): sys.modules[name] = None\n"
        "import psal, psal.serve, psal.cli.main\n"
        "sys.exit(psal.cli.main.main(['serve']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "psal serve: error: psal serve needs starlette, uvicorn, python-multipart: pip install 'psal[serve]'"
