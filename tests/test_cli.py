"""The ``psal`` command: results on real files, and one readable line for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from psal.cli.main import main
from psal.tasks import files as io
from psal.tasks.files import read_image

Image = pytest.importorskip("PIL.Image")


def _rgb(seed: int, size=(24, 20)) -> np.ndarray:
    """A smooth random colour image, uint8 ``(H, W, 3)``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return (big[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture
def files(tmp_path):
    q, s = tmp_path / "query.png", tmp_path / "source.png"
    Image.fromarray(_rgb(0)).save(q)
    Image.fromarray(_rgb(1, (30, 26))).save(s)
    return tmp_path, str(q), str(s)


def _run(capsys, *argv):
    code = main([*argv, "--quiet"] if argv and argv[0] != "--version" else list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_reconstruct_writes_the_image_and_the_report(files, capsys):
    tmp, q, s = files
    out, report = str(tmp / "out.png"), str(tmp / "r.json")
    code, err = _run(capsys, "reconstruct", q, s, "-o", out, "--report", report, "--patch-size", "3", "--device", "cpu")
    assert code == 0, err
    got = np.asarray(Image.open(out))
    assert got.shape == (24, 20, 3)
    metrics = json.load(open(report))
    assert metrics["command"] == "reconstruct" and metrics["size"] == [24, 20]
    # every output pixel is a source pixel (center aggregation, k = 1)
    source_colours = {tuple(c) for c in np.asarray(Image.open(s)).reshape(-1, 3)}
    assert all(tuple(c) in source_colours for c in got.reshape(-1, 3))


def test_reconstruct_from_itself_is_exact(files, capsys):
    tmp, q, _ = files
    out = str(tmp / "self.png")
    code, err = _run(capsys, "reconstruct", q, q, "-o", out, "--patch-size", "5", "--iters", "20", "--device", "cpu")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(q)))


def test_same_seed_same_result(files, capsys):
    tmp, q, s = files
    outs = [str(tmp / f"o{i}.png") for i in range(3)]
    for out, seed in zip(outs, (3, 3, 4)):
        assert _run(capsys, "reconstruct", q, s, "-o", out, "--seed", str(seed), "--k", "2", "--aggregation", "patch")[0] == 0
    a, b = (np.asarray(Image.open(o)) for o in outs[:2])
    assert np.array_equal(a, b)


def _bad(capsys, argv, pattern):
    code, err = _run(capsys, *argv)
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    return err


def test_bad_files_get_one_line(files, capsys):
    tmp, q, s = files
    out = str(tmp / "out.png")
    _bad(capsys, ["reconstruct", str(tmp / "missing.png"), s, "-o", out], "query")
    (tmp / "junk.png").write_text("not an image")
    _bad(capsys, ["reconstruct", q, str(tmp / "junk.png"), "-o", out], "not a readable image")
    _bad(capsys, ["reconstruct", q, s, "-o", q], "is also an input")
    _bad(capsys, ["reconstruct", q, s, "-o", os.path.join(os.path.dirname(q), ".", "query.png")], "is also an input")
    _bad(capsys, ["reconstruct", q, s, "-o", str(tmp / "out.xyz")], "unknown image type")
    _bad(capsys, ["reconstruct", q, s, "-o", str(tmp / "nofolder" / "o.png")], "does not exist")
    _bad(capsys, ["reconstruct", q, s, "-o", out, "--report", q], "--report")
    _bad(capsys, ["reconstruct", q, s, "-o", out, "--patch-size", "4"], "patch_size")
    if not torch.cuda.is_available():
        _bad(capsys, ["reconstruct", q, s, "-o", out, "--device", "cuda"], "no CUDA device")
    assert not os.path.exists(out)


def test_image_kinds(tmp_path):
    rgb = _rgb(2)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], 2)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert torch.equal(io.read_image(str(tmp_path / "opaque.png")), torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0)
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    with pytest.raises(io.InputError, match="transparent pixels"):
        io.read_image(str(tmp_path / "clear.png"))
    deep = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 100).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    got = io.read_image(str(tmp_path / "deep.png"))
    assert got.shape == (1, 1, 24, 20)
    torch.testing.assert_close(got[0, 0], torch.from_numpy(deep.astype(np.float32) / 65535))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    assert io.read_image(str(tmp_path / "gray.png")).shape == (1, 1, 24, 20)


def test_sixteen_bit_gray_stays_sixteen_bit(tmp_path, capsys):
    """A 16-bit grayscale input gives a 16-bit result; inpainting keeps its known pixels exactly."""
    g = torch.Generator().manual_seed(5)
    low = torch.rand(1, 1, 5, 5, generator=g)
    deep = torch.nn.functional.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    deep = (deep[0, 0].double().numpy() * 65535).round().astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[10:18, 12:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    code, err = _run(capsys, "inpaint", str(tmp_path / "deep.png"), str(tmp_path / "mask.png"), "-o", str(out), "--device", "cpu")
    assert code == 0, err
    got = np.asarray(Image.open(out))
    assert got.dtype.itemsize == 2 or Image.open(out).mode.startswith("I")
    got = got.astype(np.int64)
    known = mask == 0
    assert np.array_equal(got[known], deep.astype(np.int64)[known])
    assert (got[~known] % 257 != 0).any()  # not 8-bit values scaled up


def test_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    Image.fromarray(_rgb(3)).save(tmp_path / "a.png")
    # Pillow's decompression-bomb warning (above its pixel limit) is not printed: the memory check decides
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the image has 480 pixels: Pillow warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.read_image(str(tmp_path / "a.png")).shape == (1, 3, 24, 20)
    monkeypatch.setattr(io, "available_memory", lambda: 1000)
    with pytest.raises(io.InputError, match="GiB available; resize it first"):
        io.read_image(str(tmp_path / "a.png"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")

    def broken(self, fp, *args, **kwargs):
        fp.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.write_image(torch.rand(1, 3, 4, 4), str(out))
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_json_reports_are_written_atomically(tmp_path, monkeypatch):
    from psal import images

    out = tmp_path / "report.json"
    images.write_json(out, {"a": 1.5, "path": tmp_path})
    assert json.loads(out.read_text()) == {"a": 1.5, "path": str(tmp_path)}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        images.write_json(out, {"a": 2})
    assert json.loads(out.read_text())["a"] == 1.5
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_console_entry_point_prints_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "psal.cli", "reconstruct", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(tmp_path / "c.png")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == f"psal reconstruct: error: query '{tmp_path / 'a.png'}': no such file"


def test_colorize_keeps_the_gray_and_refuses_a_gray_reference(files, capsys):
    tmp, q, s = files
    gray = str(tmp / "gray.png")
    Image.open(q).convert("L").save(gray)
    out = str(tmp / "col.png")
    code, err = _run(capsys, "colorize", gray, s, "-o", out, "--device", "cpu", "--report", str(tmp / "c.json"))
    assert code == 0, err
    got = np.asarray(Image.open(out))
    assert got.shape == (24, 20, 3) and json.load(open(tmp / "c.json"))["command"] == "colorize"
    _bad(capsys, ["colorize", q, gray, "-o", str(tmp / "x.png")], "needs a colour reference")


def test_colorize_with_a_colour_network_checkpoint(files, capsys):
    """``--checkpoint``: a colour network of psal.apps.colour_net colours the picture (its output
    is the network's, bit for bit) and keeps the gray; a file that is not one is one line."""
    from psal.apps.colour_net import ColourNet, colorize_with_model
    from psal.examples.train_colorization import _save

    tmp, q, s = files
    gray = str(tmp / "gray.png")
    Image.open(q).convert("L").save(gray)
    torch.manual_seed(0)
    model = ColourNet("psal", width=4, features=3, values=3).eval()
    ckpt = str(tmp / "net.pt")
    _save(ckpt, model, {"steps": 0})
    out = str(tmp / "col.png")
    code, err = _run(capsys, "colorize", gray, s, "-o", out, "--checkpoint", ckpt, "--report", str(tmp / "c.json"))
    assert code == 0, err
    assert json.load(open(tmp / "c.json"))["model"] == ckpt
    want = colorize_with_model(read_image(gray, "gray"), read_image(s, "reference"), model, seed=0)
    got = read_image(out, "out")
    assert float((got - want).abs().max()) <= 1 / 255 + 1e-6  # 8-bit rounding only
    # --model: the network shipped in the package
    code, err = _run(capsys, "colorize", gray, s, "-o", str(tmp / "shipped.png"), "--model")
    assert code == 0, err
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    _bad(capsys, ["colorize", gray, s, "-o", str(tmp / "y.png"), "--checkpoint", str(tmp / "junk.pt")], "not a colour network of psal")
    _bad(capsys, ["colorize", gray, s, "-o", str(tmp / "y.png"), "--checkpoint", ckpt, "--match-luminance"], "--match-luminance is for")


def test_upscale_writes_the_enlarged_image(files, capsys, monkeypatch):
    tmp, q, _ = files
    out = str(tmp / "up.png")
    code, err = _run(capsys, "upscale", q, "--scale", "3", "-o", out, "--device", "cpu", "--report", str(tmp / "u.json"), "--steps", "4")
    assert code == 0, err
    assert np.asarray(Image.open(out)).shape == (72, 60, 3)
    report = json.load(open(tmp / "u.json"))
    assert report["method"] == "network" and report["mean_abs_error_after_shrinking"] < 0.01
    fast = str(tmp / "fast.png")
    code, err = _run(capsys, "upscale", q, "--scale", "3", "-o", fast, "--fast", "--report", str(tmp / "f.json"))
    assert code == 0, err
    assert json.load(open(tmp / "f.json"))["method"] == "patch"
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(fast)))  # two methods
    _bad(capsys, ["upscale", q, "-o", str(tmp / "x.png"), "--steps", "0"], "steps must be")
    # an option of the other method is refused, not ignored
    _bad(capsys, ["upscale", q, "-o", str(tmp / "x.png"), "--fast", "--steps", "9"], "--steps is an option of --method network")
    _bad(capsys, ["upscale", q, "-o", str(tmp / "x.png"), "--k", "3"], "--k is an option of --method patch")
    assert not (tmp / "x.png").exists()
    pytest.importorskip("tqdm")
    assert main(["upscale", q, "-o", str(tmp / "bar.png"), "--steps", "3", "--device", "cpu"]) == 0
    assert "loss 0." in capsys.readouterr().err  # the bar shows the training loss
    # the network's working set is 2.5 times the patch method's: x4 of 24 x 20 fits the one only
    monkeypatch.setattr("psal.tasks.files.available_memory", lambda: 24 * 20 * 16 * 400 * 2)
    _bad(
        capsys,
        ["upscale", q, "--scale", "4", "-o", str(tmp / "big.png")],
        "enlarged 4x by the network method needs the memory of 19200 pixels",
    )
    code, err = _run(capsys, "upscale", q, "--scale", "4", "-o", str(tmp / "big.png"), "--fast")
    assert code == 0, err


def test_inpaint_keeps_known_pixels_and_refuses_bad_masks(files, capsys):
    tmp, q, _ = files
    mask = np.zeros((24, 20), np.uint8)
    mask[8:14, 6:12] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    out = str(tmp / "filled.png")
    code, err = _run(capsys, "inpaint", q, str(tmp / "mask.png"), "-o", out, "--patch-size", "3", "--device", "cpu")
    assert code == 0, err
    got, before = np.asarray(Image.open(out)), np.asarray(Image.open(q))
    assert np.array_equal(got[mask == 0], before[mask == 0])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp / "small.png")
    _bad(capsys, ["inpaint", q, str(tmp / "small.png"), "-o", str(tmp / "x.png")], "must be the same size")
    Image.fromarray(np.zeros((24, 20), np.uint8)).save(tmp / "empty.png")
    _bad(capsys, ["inpaint", q, str(tmp / "empty.png"), "-o", str(tmp / "x.png")], "nothing to fill")
    Image.fromarray(np.full((24, 20), 255, np.uint8)).save(tmp / "all.png")
    _bad(capsys, ["inpaint", q, str(tmp / "all.png"), "-o", str(tmp / "x.png")], "no known pixel")
    assert not os.path.exists(tmp / "x.png")


def test_demo_writes_results_gallery_and_metrics(tmp_path, capsys):
    pytest.importorskip("skimage")
    code, err = _run(capsys, "demo", "--out", str(tmp_path), "--size", "64", "--device", "cpu")
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "demo_gallery.png" in names and "demo_metrics.json" in names and "inpaint_brick.png" in names
    metrics = json.load(open(tmp_path / "demo_metrics.json"))["metrics"]
    assert set(metrics) == {"inpaint_brick", "inpaint_chelsea", "colorize_coffee", "upscale_camera_x2", "reconstruct_astronaut_from_coffee"}
    assert metrics["upscale_camera_x2"]["y_psnr_db"] > metrics["upscale_camera_x2"]["bicubic_y_psnr_db"]


def test_demo_runs_only_the_tasks_asked(tmp_path, capsys):
    pytest.importorskip("skimage")
    code, err = _run(capsys, "demo", "--tasks", "colorize", "reconstruct", "--out", str(tmp_path), "--size", "32", "--device", "cpu")
    assert code == 0, err
    assert set(json.load(open(tmp_path / "demo_metrics.json"))["metrics"]) == {"colorize_coffee", "reconstruct_astronaut_from_coffee"}
    assert not (tmp_path / "inpaint_brick.png").exists()
    with pytest.raises(SystemExit) as exc:  # argparse's own refusal: usage and one error line
        main(["demo", "--tasks", "paint", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "invalid choice: 'paint'" in capsys.readouterr().err


def test_inpaint_with_the_trained_model(files, capsys, tmp_path):
    from psal.apps.inpaint_net import PRETRAINED_PATH

    assert os.path.isfile(PRETRAINED_PATH), "the trained weights ship with the package"
    _, q, _ = files
    mask = np.zeros((24, 20), np.uint8)
    mask[6:14, 5:12] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out, zero_shot, report = str(tmp_path / "net.png"), str(tmp_path / "zs.png"), str(tmp_path / "r.json")
    code, err = _run(capsys, "inpaint", "--model", q, str(tmp_path / "m.png"), "-o", out, "--report", report, "--device", "cpu")
    assert code == 0, err
    assert json.load(open(report))["model"] == PRETRAINED_PATH
    code, err = _run(capsys, "inpaint", q, str(tmp_path / "m.png"), "-o", zero_shot, "--device", "cpu")
    assert code == 0, err
    got, src, other = (np.asarray(Image.open(p)).astype(int) for p in (out, q, zero_shot))
    known = mask == 0
    assert np.array_equal(got[known], src[known])
    assert not np.array_equal(got[~known], other[~known])  # another method than the default
    # a missing checkpoint, or a file that is not one: one line each, the output untouched
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for model, message in (("nope.pt", "no such file"), (str(tmp_path / "junk.pt"), "not an inpainting checkpoint")):
        code, err = _run(capsys, "inpaint", q, str(tmp_path / "m.png"), "-o", out, "--checkpoint", model)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert np.array_equal(np.asarray(Image.open(out)).astype(int), got)


@pytest.mark.parametrize("command", ["inpaint", "upscale"])
def test_ctrl_c_during_a_long_run_leaves_no_output_and_one_line(tmp_path, command):
    """SIGINT once the work has started (its progress bar is on stderr): exit 130, one line, no
    output file (not even a partial or temporary one), the inputs untouched."""
    import signal
    import time

    image = tmp_path / "image.png"
    Image.fromarray(_rgb(2, (320, 320))).save(image)
    argv = [str(image)]
    if command == "inpaint":
        hole = np.zeros((320, 320), dtype=np.uint8)
        hole[60:260, 80:240] = 255
        Image.fromarray(hole).save(tmp_path / "hole.png")
        argv.append(str(tmp_path / "hole.png"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out.png"
    # As from a terminal: Ctrl-C not ignored. A test run started in the background by a shell
    # without job control (`cmd &` in a script) inherits SIGINT ignored, and Python keeps it so.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        [sys.executable, "-m", "psal.cli", command, *argv, "-o", str(out)], stderr=subprocess.PIPE, preexec_fn=default_sigint
    )
    seen, start = b"", time.monotonic()
    while command.encode() + b":" not in seen and time.monotonic() - start < 120:  # the bar: the work has begun
        chunk = proc.stderr.read1(256)
        if not chunk:
            break
        seen += chunk
    assert proc.poll() is None, f"psal {command} ended before it could be interrupted: {seen[-300:]!r}"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, (seen + rest)[-500:]
    last = (seen + rest).decode(errors="replace").replace("\r", "\n").strip().splitlines()[-1]
    assert last == f"psal {command}: interrupted"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing changed


def test_folders_in_folders_out_and_one_corrupt_file(tmp_path, capsys):
    """20 pictures, one of them corrupt: 19 results written under their own names, exit 1, the
    corrupt file named; masks matched by file name whatever their extension."""
    pics, masks, out = tmp_path / "pics", tmp_path / "masks", tmp_path / "out"
    pics.mkdir(), masks.mkdir()
    hole = np.zeros((24, 20), np.uint8)
    hole[8:14, 6:12] = 255
    for i in range(20):
        Image.fromarray(_rgb(10 + i)).save(pics / f"p{i:02d}.png")
        Image.fromarray(hole).save(masks / f"p{i:02d}.bmp")
    (pics / "p07.png").write_bytes(b"not a picture")
    (pics / "notes.txt").write_text("not a picture either, and not one by its name: skipped")
    code, err = _run(capsys, "inpaint", str(pics), str(masks), "-o", str(out), "--patch-size", "3", "--device", "cpu")
    assert code == 1
    failed = [line for line in err.splitlines() if "failed:" in line]
    assert len(failed) == 1 and "p07.png" in failed[0] and "Traceback" not in err
    assert "19 of 20 pictures written" in err.splitlines()[-1]
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"p{i:02d}.png" for i in range(20) if i != 7]
    for name in written:  # each is the one-file command's result: known pixels kept
        got, before = np.asarray(Image.open(out / name)), np.asarray(Image.open(pics / name))
        assert np.array_equal(got[hole == 0], before[hole == 0]) and not np.array_equal(got, before)
    # the same folder through upscale (patch method) and a missing mask: named, the others written
    few = tmp_path / "few"
    few.mkdir()
    for name in ("p00.png", "p03.png"):
        (few / name).write_bytes((pics / name).read_bytes())
    (masks / "p03.bmp").unlink()
    code, err = _run(capsys, "inpaint", str(few), str(masks), "-o", str(tmp_path / "out2"), "--patch-size", "3")
    assert code == 1 and "p03.png: no mask named p03.*" in err and "1 of 2" in err
    code, err = _run(capsys, "upscale", str(pics), "-o", str(tmp_path / "up"), "--fast")
    assert code == 1 and "19 of 20" in err
    assert np.asarray(Image.open(tmp_path / "up" / "p00.png")).shape == (48, 40, 3)
    code, err = _run(capsys, "colorize", str(few), str(pics / "p01.png"), "-o", str(tmp_path / "col"), "--device", "cpu")
    assert code == 0 and "2 of 2 pictures written" in err  # one reference for the folder
    assert sorted(p.name for p in (tmp_path / "col").iterdir()) == ["p00.png", "p03.png"]
    # wrong folders: one line, exit 2, nothing written
    _bad(capsys, ["upscale", str(pics), "-o", str(pics)], "is also an input folder")
    _bad(capsys, ["upscale", str(pics), "-o", str(tmp_path / "x.png")], "the output must be a folder")
    _bad(capsys, ["inpaint", str(pics), str(masks / "p00.bmp"), "-o", str(tmp_path / "o3")], "give a folder of masks")
    _bad(capsys, ["inpaint", str(pics), str(pics), "-o", str(tmp_path / "o5")], "keep the masks in a folder of their own")
    _bad(capsys, ["colorize", str(few), str(few / "p00.png"), "-o", str(tmp_path / "o6"), "--device", "nope"], "--device: unknown device")
    # an option every picture fails on alike: said once, exit 2, not once per file
    err = _bad(capsys, ["upscale", str(few), "-o", str(tmp_path / "o7"), "--steps", "0"], "steps must be")
    assert "for all 2 pictures" in err
    Image.fromarray(hole).save(masks / "p00.png")  # beside p00.bmp: which one is meant?
    _bad(capsys, ["inpaint", str(few), str(masks), "-o", str(tmp_path / "o8")], "two masks named p00.*")
    (tmp_path / "empty").mkdir()
    _bad(capsys, ["upscale", str(tmp_path / "empty"), "-o", str(tmp_path / "o4")], "holds no picture")
    assert not any((tmp_path / f"o{i}").exists() for i in (3, 4, 5, 6, 8))
