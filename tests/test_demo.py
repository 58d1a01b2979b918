"""`make demo`'s program: runs, writes its pictures, and the rebuild is made of source pixels."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("PIL")

from psal import images  # noqa: E402
from psal.cli import demo  # noqa: E402


def test_demo_writes_pictures(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--size", "64", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "PSNR of the rebuilt astronaut" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut_from_coffee.png", "demo_panel.png"]


def test_rebuild_takes_source_pixels():
    target = images.load_bundled("chelsea", 32)
    source = images.load_bundled("coffee", (24, 40))
    rebuilt, field = demo.rebuild(target, source, patch_size=3, num_iters=2, seed=0)
    flat = source.flatten(2)[0].T  # (positions, 3)
    want = flat[field.indices[0, 0, 0].flatten()].T.reshape(1, 3, 32, 32)
    assert torch.equal(rebuilt, want)


def test_save_png_round_trip(tmp_path):
    picture = torch.rand(1, 3, 5, 7)
    path = tmp_path / "x.png"
    images.save_png(picture, path)
    from PIL import Image

    back = images.to_tensor(__import__("numpy").asarray(Image.open(path)))
    assert torch.allclose(back, picture, atol=1 / 255)
