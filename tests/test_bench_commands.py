"""The evaluation commands run end to end at small sizes and report what they measured."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("skimage")


def test_scenarios_build_the_inputs_and_truths():
    pytest.importorskip("skimage")
    from psal import images
    from psal.apps import scenarios

    truth, hole = scenarios.inpaint_case("chelsea", 96)
    assert truth.shape == (1, 3, 96, 96) and hole.shape == (1, 1, 96, 96) and hole.dtype == torch.bool
    assert 0.12 <= hole.float().mean() <= 0.25
    assert torch.equal(scenarios.inpaint_case("chelsea", 96)[1], hole)  # seeded by the name
    shown = scenarios.inpaint_shown(truth, hole)
    assert torch.equal(shown[~hole.expand_as(truth)], truth[~hole.expand_as(truth)])
    assert torch.equal(shown[:, 1][hole[:, 0]], torch.zeros(int(hole.sum())))
    gray, reference, target = scenarios.colorize_case("coffee", 64)
    assert gray.shape == (1, 1, 64, 64) and reference.shape == target.shape == (1, 3, 64, 64)
    assert torch.allclose(gray, 0.299 * target[:, :1] + 0.587 * target[:, 1:2] + 0.114 * target[:, 2:], atol=1e-6)
    low, high = scenarios.upscale_case("camera", 65, 3)
    assert high.shape == (1, 3, 63, 63) and low.shape == (1, 3, 21, 21)
    # a picture shrunk to a longest side keeps its aspect; one smaller is left alone
    coffee = images.load_bundled("coffee", longest=300)
    assert coffee.shape == (1, 3, 200, 300)
    assert images.load_bundled("chelsea", longest=1000).shape == (1, 3, 300, 451)
    with pytest.raises(ValueError, match="size or longest"):
        images.load_bundled("coffee", 64, longest=300)


def test_bench_photos_small(tmp_path, capsys):
    """The photo-size suite at a toy size: an enlarged picture, both hole kinds, a process each."""
    from psal.bench import photos

    report = tmp_path / "photos.json"
    argv = ["--pictures", "astronaut@1.5", "--longest", "64", "--holes", "object", "large", "--methods", "psal",
            "--colorize", "coffee@0.25", "--reference", "chelsea", "--upscale", "camera@0.125", "--json", str(report)]  # fmt: skip
    assert photos.main(argv) == 0
    assert "| astronaut@1.5" in capsys.readouterr().out
    small, large, colour, up = json.loads(report.read_text())["results"]
    assert up["task"] == "upscale" and (up["width"], up["height"], up["scale"]) == (64, 64, 2) and up["seconds"] > 0
    assert colour["task"] == "colorize" and (colour["width"], colour["height"]) == (150, 100) and colour["seconds"] > 0
    assert (small["hole_kind"], large["hole_kind"], small["width"], small["height"]) == ("object", "large", 96, 96)
    assert 0.02 < small["hole"] < 0.08 and 0.15 < large["hole"] < 0.25
    for r in (small, large):
        assert r["method"] == "psal" and r["seconds"] > 0 and r["peak_mib"] > 0 and r["hole_psnr_db"] > 10


def test_bench_apps_small(tmp_path, capsys):
    """The apps suite at a toy size, without the optional peers (they are benchmark extras)."""
    from psal.apps import scenarios
    from psal.bench import apps

    report, gallery = tmp_path / "apps.json", tmp_path / "gallery.png"
    argv = ["--side", "48", "--photos", "astronaut", "--textures", "brick", "--families", "square", "strokes", "--peers",
            "opencv-telea", "--colour", "coffee", "--scales", "2", "4", "--sr-photos", "astronaut", "--sr-textures", "brick",
            "--sr-steps", "3", "--tasks", "inpaint", "colorize", "upscale", "upscale-resized", "--size", "64",
            "--gallery", str(gallery), "--json", str(report)]  # fmt: skip
    assert apps.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| photos (1)" in printed and "| textures (1)" in printed and "psal wins" in printed
    assert re.search(r"^\| x4 +\| photos \(1\) +\| cnn ", printed, re.M) and "x4:" in printed  # the two upscale suites
    results = json.loads(report.read_text())["results"]
    inpaint = [r for r in results["inpaint"] if r["method"] == "psal"]
    assert [(r["group"], r["picture"], r["family"]) for r in inpaint] == [
        ("photos", "astronaut", "square"), ("photos", "astronaut", "strokes"), ("textures", "brick", "square"), ("textures", "brick", "strokes")
    ]  # fmt: skip
    for r in inpaint:
        assert r["psnr"] > 10 and 0 < r["ssim"] <= 1 and r["swd"] > 0 and 0.3 < r["gradient"] < 2 and r["known"] == 0 and r["seconds"] > 0
    colour = results["colorize"]
    # the shipped colour network (issue 31) is one of the methods, paired against the others too
    assert {(r["method"], r["direction"]) for r in colour} == {
        (m, d) for m in ("psal", "psal network", "mean colour", "welsh", "welsh+levin", "welsh+levin, remapped") for d in ("L>R", "R>L")
    }
    assert "psal network wins" in printed
    for r in colour:
        assert r["picture"] == "coffee" and r["chroma_psnr"] > 15 and r["delta_e"] > 0 and 0 < r["colourfulness"] < 3
    upscale = results["upscale"]
    methods = ("bicubic", "back-projection", "patch", "cnn")
    assert [(r["scale"], r["group"], r["picture"], r["method"]) for r in upscale] == [
        (s, g, p, m) for s in (2, 4) for g, p in (("photos", "astronaut"), ("textures", "brick")) for m in methods
    ]
    for case in zip(*[iter(upscale)] * 4):
        y = {r["method"]: r["y_psnr"] for r in case}
        # back-projection makes the result consistent with its input: never below bicubic
        assert y["back-projection"] >= y["bicubic"] and y["patch"] >= y["bicubic"] - 0.5
        assert all(0 < r["y_ssim"] <= 1 and r["seconds"] > 0 for r in case)
    assert set(results["upscale-resized"]) == {"x2", "x4"}
    for scale in ("x2", "x4"):
        per = results["upscale-resized"][scale]
        assert len(per["psal"]) == len(scenarios.UPSCALE_PICTURES)
        assert sum(p for p, _ in per["psal"]) >= sum(p for p, _ in per["bicubic"])
    assert gallery.stat().st_size > 1000


def test_evaluation_cases_are_crops_and_seeded_hole_families():
    from psal import images
    from psal.apps import scenarios

    crop = scenarios.crop("retina", 100)
    full = images.load_bundled("retina")
    assert crop.shape == (1, 3, 100, 100)
    assert torch.equal(crop, full[..., 655:755, 655:755])  # its own pixels, centred, not resized
    reference, truth = scenarios.colour_halves("chelsea")  # 300 x 451: squares of min(256, 300, 225)
    chelsea = images.load_bundled("chelsea")
    assert reference.shape == truth.shape == (1, 3, 225, 225)
    assert torch.equal(reference, chelsea[..., 37:262, 0:225]) and torch.equal(truth, chelsea[..., 37:262, 225:450])
    cover = {f: float(scenarios.eval_hole(f, "coffee", 256).float().mean()) for f in scenarios.MASK_FAMILIES}
    assert cover["square"] == 0.25 and 0.12 <= cover["blobs"] <= 0.22 and 0.05 <= cover["strokes"] < 0.07
    assert torch.equal(scenarios.eval_hole("blobs", "coffee", 256), scenarios.eval_hole("blobs", "coffee", 256))
    assert not torch.equal(scenarios.eval_hole("blobs", "coffee", 256), scenarios.eval_hole("blobs", "rocket", 256))
    strokes = scenarios.eval_hole("strokes", "coffee", 256)[0, 0]
    # thin: no stroke pixel is more than 4 pixels from the known region
    assert not torch.nn.functional.max_pool2d((~strokes).float()[None], 9, stride=1, padding=4).eq(0).any()
    with pytest.raises(ValueError, match="family must be one of"):
        scenarios.eval_hole("disc", "coffee", 64)
    # the held-out cases: the crop half a side up and left (clipped), other holes of the same kinds
    assert torch.equal(scenarios.crop("retina", 100, held_out=True), full[..., 605:705, 605:705])
    assert torch.equal(scenarios.crop("chelsea", 256, held_out=True), chelsea[..., 0:256, 0:256])
    for family in scenarios.MASK_FAMILIES:
        other = scenarios.eval_hole(family, "coffee", 256, held_out=True)
        assert not torch.equal(other, scenarios.eval_hole(family, "coffee", 256))
        assert abs(float(other.float().mean()) - cover[family]) < 0.11


def test_paired_comparison_by_hand():
    from psal.bench.common import paired

    res = paired([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 5.0], lower_is_better=True)
    # differences -1, 0, +2, -1: two wins, one tie (half), one loss
    assert res["wins"] == 0.625 and res["mean_difference"] == 0.0 and res["cases"] == 4
    lo, hi = res["ci95"]
    assert -1.0 <= lo < 0.0 < hi <= 2.0  # the bootstrap means lie between the smallest and largest difference
    assert paired([5.0] * 3, [4.0] * 3, lower_is_better=False) == {
        "wins": 1.0,
        "mean_difference": 1.0,
        "ci95": [1.0, 1.0],
        "cases": 3,
        "groups": 3,
    }
    # grouped: two pictures whose cases agree; a resample is all of one, all of the other, or both
    grouped = paired([1.0, 1.0, 1.0, 4.0], [0.0] * 4, lower_is_better=True, groups=["a", "a", "a", "b"])
    assert grouped["groups"] == 2 and grouped["ci95"] == [1.0, 4.0]  # whole groups: 1, 4 or (3 + 4) / 4 = 1.75
    ungrouped = paired([1.0, 1.0, 1.0, 4.0], [0.0] * 4, lower_is_better=True)
    assert ungrouped["ci95"][1] < 4.0  # resampling cases alone would rarely draw the 4 four times
    with pytest.raises(ValueError, match="paired"):
        paired([], [], lower_is_better=True)
    with pytest.raises(ValueError, match="got 1 and 3"):
        paired([1.0], [1.0, 2.0, 3.0], lower_is_better=True)
    with pytest.raises(ValueError, match="groups"):
        paired([1.0, 2.0], [1.0, 2.0], lower_is_better=True, groups=["a"])


def test_bench_training_memory_small(tmp_path, capsys):
    """One training step per model in its own process; the naive full attention's N x N softmax
    shows in its peak memory."""
    from psal.bench import training

    report = tmp_path / "training.json"
    assert training.main(["--sizes", "96", "--models", "psal", "naive", "--json", str(report)]) == 0
    assert "| 96²" in capsys.readouterr().out
    results = json.loads(report.read_text())["results"]
    psal, naive = results["psal@96"], results["naive@96"]
    assert psal["seconds"] > 0 and psal["peak_bytes"] > 0
    # 48 x 48 half-resolution positions: the score, softmax and gradient matrices are 2304^2
    # floats, 21 MB each
    assert naive["peak_bytes"] > psal["peak_bytes"] + 2 * 2304**2 * 4


def test_gpu_check_dry_run(tmp_path, capsys):
    """``python -m psal.bench gpu OUT --dry-run``: every section of the GPU check runs at tiny sizes
    on the CPU (the test selection is only collected), so that the command cannot rot between the
    rare runs on a GPU."""
    from psal.bench import gpu

    assert gpu.main([str(tmp_path), "--dry-run", "--device", "cpu", "--peer", str(tmp_path / "none")]) == 0
    printed = capsys.readouterr().out
    assert "**Search**" in printed and "**Layer forward + backward**" in printed
    assert (tmp_path / "gpu_check.md").read_text().strip() in printed
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert set(sections) == {"tests", "variants", "search", "layer", "precision", "race", "peer"}
    assert sections["tests"]["exit"] == 0 and "collected" in sections["tests"]["summary"]
    # The variants through Triton's interpreter (small patches only, for time): both families give
    # the reference's field, and the rule keeps one of them (the timings mean nothing here).
    variants = sections["variants"]
    rows = variants["search"]["small"]["rows"]
    assert [r["name"] for r in rows] == ["lanes-pad-32x1", "tiles-16x16x2"] and all(r["same"] for r in rows)
    assert variants["chosen"]["small"] in ("lanes-pad-32x1", "tiles-16x16x2")
    assert variants["chosen"]["key_grad"] in ("gather", "atomic") and "TUNED = {" in variants["tuned_line"]
    schemes = variants["schemes"]["rows"]
    assert [(r["prop_k"], r["rand_k"]) for r in schemes] == [(3, 3), (1, 1)] and all(r["ratio"] >= 1 - 1e-6 for r in schemes)
    search = sections["search"]
    assert [r["iters"] for r in search["runs"]] == [1, 2]
    for r in search["runs"]:  # no search beats the exact one; the costs are real
        assert r["ratio"] >= 1 - 1e-6 and r["ms"] > 0 and r["mean"] > 0
    layer = sections["layer"]["sizes"]
    assert all(row["psal_ms"] > 0 for row in layer.values())
    assert layer["32"]["flash_extrapolated_from"] == 16
    precision = sections["precision"]["cases"]
    assert len(precision) == 2 * 2 * 5 and all(c["ours"] < 0.05 for c in precision if c["tensor"] != "temperature")
    race = sections["race"]["fields"]
    assert len(race) == 4 and all(r["deterministic_equal"] == 3 for r in race.values())
    assert "skipped" in sections["peer"]
    # The report is made from the saved results alone.
    assert gpu.main(["--render", str(tmp_path / "gpu_check.json")]) == 0
    assert capsys.readouterr().out.strip() == (tmp_path / "gpu_check.md").read_text().strip()


@pytest.mark.parametrize("peer", ["pypatchmatch", "resynthesizer", "opencv-fsr-fast", "opencv-telea", "biharmonic"])
def test_inpainting_peers_fill_the_hole_with_the_pictures_colour(peer):
    """Each peer wrapper on a picture of two colours, red left and blue right, with a hole inside
    the red half: the fill must be red (no RGB/BGR swap, the hole is where our mask says), and the
    known pixels kept (within the 8-bit rounding every peer works in). Skipped where the peer does
    not import (they are `bench` extras)."""
    from psal.bench import peers

    if not peers.available(peer):
        pytest.skip(f"{peer} does not import here")
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, :, :32] = 0.8  # red left
    image[:, 2, :, 32:] = 0.8  # blue right
    image[:, 1] = 0.1
    hole = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    hole[..., 24:40, 8:20] = True
    out = peers.INPAINT[peer][0](image, hole)
    assert out.shape == image.shape
    known = ~hole.expand_as(image)
    assert float((out - image).abs()[known].max()) <= 1.5 / 255
    fill = out[..., 24:40, 8:20].mean((2, 3))[0]
    torch.testing.assert_close(fill, torch.tensor([0.8, 0.1, 0.0]), atol=0.05, rtol=0)


def test_bench_profile_small(capsys):
    """The search profile at a toy size prints every variant, and its stage bits do what they
    say: with neither propagation nor random search, or with no cost, iterations leave the
    random start as it is; the search as it is improves it."""
    from psal.backends.numba import kernels
    from psal.backends.numba import search as numba_search
    from psal.bench import profile

    assert profile.main(["--size", "24", "--repeats", "1", "--iters", "2", "--quality-sample", "64"]) == 0
    printed = capsys.readouterr().out
    for name, _ in profile._VARIANTS:
        assert f"| {name} " in printed
    assert "mean cost ratio to exact" in printed
    q, k = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0)), torch.rand(1, 3, 24, 24)
    start = numba_search.patchmatch(q, k, None, 3, 5, 0, "l2", None, 7)[1]
    none = kernels.ALL_STAGES & ~kernels.RANDOM & ~kernels.PROPAGATE
    for stages in (none, kernels.ALL_STAGES & ~kernels.COST):
        assert torch.equal(numba_search.patchmatch(q, k, None, 3, 5, 3, "l2", None, 7, stages=stages)[1], start)
    assert numba_search.patchmatch(q, k, None, 3, 5, 3, "l2", None, 7)[1].mean() < start.mean()


def test_bench_attention_against_a_convolution(tmp_path, capsys):
    """The layer suite at a toy size: psal with q = k and the 3x3 convolution it is compared with,
    each in its own process, the ``x conv3x3`` column the ratio of their medians."""
    from psal.bench import attention

    report = tmp_path / "attention.json"
    argv = ["--sizes", "16", "--methods", "psal-qk", "conv3x3", "--channels", "8", "--repeats", "2", "--json", str(report)]
    assert attention.main(argv) == 0
    out = capsys.readouterr().out
    assert "x conv3x3" in out
    records = {r["method"]: r for r in json.loads(report.read_text())["results"]}
    assert set(records) == {"psal-qk", "conv3x3"}
    for r in records.values():
        assert r["size"] == 16 and len(r["times_s"]) == 2 and r["median_s"] > 0
    ratio = records["psal-qk"]["median_s"] / records["conv3x3"]["median_s"]
    row = next(line for line in out.splitlines() if "| psal-qk" in line)
    assert row.rstrip(" |").endswith(f"{ratio:.1f}x")
    assert next(line for line in out.splitlines() if "| conv3x3" in line).rstrip(" |").endswith("1.0x")


def test_bench_video_dry_run(tmp_path, capsys):
    """The video suite at its dry-run size: every method on the case, in a process each, with the
    metrics it reports; the layer section against SDPA; JSON and markdown written."""
    from psal.bench import video

    assert video.main(["--dry-run", "--methods", "psal-video", "psal-frames", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Goals of issue 30" in out and "**Layer forward + backward**" in out
    results = json.loads((tmp_path / "video.json").read_text())["results"]
    cases = {r["method"]: r for r in results["cases"]}
    assert set(cases) == {"psal-video", "psal-frames"}
    for r in cases.values():
        assert (r["width"], r["height"], r["frames"]) == (40, 32, 6) and 0.02 < r["hole_share"] < 0.08
        assert r["seconds"] > 0 and r["peak_mib"] > 0 and r["hole_psnr_db"] > 10 and r["flicker"] >= 0
    # the space-time fill reaches what the moving disc hides in other frames; frame by frame cannot
    assert cases["psal-video"]["hole_psnr_db"] > cases["psal-frames"]["hole_psnr_db"] + 3
    assert (tmp_path / "video.md").read_text().count("|") > 20
    # the 3-D search against exact k-NN on each video's crop: both cases, ratios of real costs
    rows = results["search"]
    assert {(r["video"], r["case"]) for r in rows} == {("pan", c) for c in video.SEARCH_CASES}
    assert all(1 - 1e-4 <= r["ratio"] < 1.5 for r in rows) and "The 3-D search against exact k-NN" in out


def test_bench_colour_video_dry_run(tmp_path, capsys):
    """The video colour suite at its dry-run size: the three methods on the pan and on the pan
    there and back, their thirds, the goal line; JSON and markdown written."""
    import torch

    from psal.apps.colorize import lab_from_rgb
    from psal.bench import colour_video

    assert colour_video.main(["--dry-run", "--videos", "pan", "return", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Goal of issue 31" in out and "**Video colour propagation**" in out
    results = json.loads((tmp_path / "colour_video.json").read_text())["results"]
    rows = {(r["video"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(v, m) for v in ("pan", "return") for m in colour_video.METHODS}
    for r in rows.values():
        assert len(r["chroma_psnr_thirds_db"]) == 3 and r["delta_e"] > 0 and r["flicker"] >= 0
    # the colours followed from the keyframe beat its mean colour in every third
    for v in ("pan", "return"):
        mine, flat = rows[(v, "psal-video")], rows[(v, "mean-colour")]
        assert all(a > b + 3 for a, b in zip(mine["chroma_psnr_thirds_db"], flat["chroma_psnr_thirds_db"]))
    # the gray frames carry the colour frames' CIE L exactly
    truth = colour_video.make_colour_video("return", 40, 32, 6)
    assert torch.equal(truth[3:], truth[:3].flip(0))
    gray = colour_video.gray_frames(truth)
    torch.testing.assert_close(lab_from_rgb(gray.expand(-1, 3, -1, -1))[:, 0], lab_from_rgb(truth)[:, 0], atol=1e-3, rtol=0)
    assert (tmp_path / "colour_video.md").read_text().count("|") > 20
    # the frame pairs: one picture never trained on, offsets 1 and 10 from frames 0 (20 is past
    # the dry run's 12 frames), every method that needs no trained weights
    pairs = results["pairs"]
    assert {(r["offset"], r["start"]) for r in pairs} == {(1, 0), (10, 0)}
    assert {"psal zero-shot", "welsh+levin", "mean colour"} <= {r["method"] for r in pairs}
    assert all(r["chroma_psnr"] > 15 and r["delta_e"] > 0 for r in pairs) and "**Colour from a reference frame**" in out
    assert "split by the videos' known motion" in out
    assert all(len(r["visible_thirds_db"]) == 3 and len(r["new_thirds_db"]) == 3 for r in rows.values())


def test_keyframe_visibility_follows_the_videos_content():
    """``keyframe_visible``: on the drift, a pixel marked shown in frame t has frame 0's content at
    its shifted place (frame 0 read bilinearly there; the frames are bilinear reads of one picture,
    so up to resampling), the others lie past frame 0's edge; on the pan, frame 0 is all shown and
    the shown share of the last frame is the overlap of its window with frame 0's, by hand."""
    import torch
    import torch.nn.functional as F

    from psal.bench import colour_video, video

    W, H, T = 80, 60, 30
    truth = colour_video.make_colour_video("drift", W, H, T)
    shown = colour_video.keyframe_visible("drift", W, H, T)
    assert shown.shape == (T, H, W) and bool(shown[0].all()) and not bool(shown[-1].all())
    vx, vy = video.drift_velocity(W, H)
    t = T - 1
    ys = torch.arange(H, dtype=torch.float64)[:, None] + vy * t
    xs = torch.arange(W, dtype=torch.float64)[None, :] + vx * t
    grid = torch.stack([((2 * xs + 1) / W - 1).expand(H, W), ((2 * ys + 1) / H - 1).expand(H, W)], -1)[None].float()
    read = F.grid_sample(truth[:1], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    err = (read - truth[t]).abs().mean(0)
    assert float(err[shown[t]].mean()) < 0.02 and float(err[shown[t]].mean()) * 3 < float(err[~shown[t]].mean())
    assert bool((ys.expand(H, W)[~shown[t]] > H - 1).logical_or(xs.expand(H, W)[~shown[t]] > W - 1).all())
    # the pan: windows (top, left, height, width) on its picture
    pan = colour_video.keyframe_visible("pan", W, H, T)
    from psal import images

    boxes = video.pan_boxes(W, H, T, *images.load_bundled(video.PAN_PICTURE).shape[-2:])
    (y0, x0, h0, w0), (y1, x1, h1, w1) = boxes[0], boxes[-1]
    overlap = max(0, min(y0 + h0, y1 + h1) - max(y0, y1)) * max(0, min(x0 + w0, x1 + w1) - max(x0, x1)) / (h1 * w1)
    assert bool(pan[0].all()) and abs(float(pan[-1].double().mean()) - overlap) < 0.03
    assert colour_video.keyframe_visible("parallax", W, H, T) is None
    ret = colour_video.keyframe_visible("return", W, H, T)
    assert torch.equal(ret[T // 2 :], ret[: T // 2].flip(0)) and bool(ret[-1].all())
