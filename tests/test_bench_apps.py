"""The evaluation command runs end to end at a small size and reports what it measured."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("skimage")


def test_bench_apps_small(tmp_path, capsys):
    from psal.bench import apps

    report, gallery = tmp_path / "apps.json", tmp_path / "gallery.png"
    argv = ["--size", "64", "--images", "brick", "camera", "--scales", "2", "4", "--gallery", str(gallery), "--json", str(report)]
    assert apps.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| mean" in printed and "x4:" in printed
    results = json.loads(report.read_text())["results"]
    inpaint = results["inpaint"]
    assert len(inpaint["psal"]) == 2 and len(inpaint["biharmonic"]) == 2
    for psnr, ratio, known_change, seconds in inpaint["psal"]:
        assert psnr > 10 and 0.3 < ratio < 2 and known_change == 0 and seconds > 0
    assert set(results["upscale"]) == {"x2", "x4"}
    for scale in ("x2", "x4"):
        per = results["upscale"][scale]
        assert len(per["psal"]) == len(apps.UPSCALE_IMAGES)
        # the upscaled picture is consistent with its input, so never far below bicubic
        assert sum(p for p, _ in per["psal"]) >= sum(p for p, _ in per["bicubic"])
    assert len(results["colorize"]["psal"]) == len(apps.COLOUR_IMAGES)
    assert gallery.stat().st_size > 1000
