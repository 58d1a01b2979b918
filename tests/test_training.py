"""Training the inpainting network: the model's contract, data-parallel training across two
``gloo`` processes, checkpoints, and resuming the same loss curve."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import gen

from psal.apps.inpaint_net import InpaintNet, inpaint_with_model, load_pretrained

pytest.importorskip("skimage")
from psal.examples import train_inpainting as T  # noqa: E402

TINY = {"crop": 32, "width": 6, "batch": 2, "num_neighbors": 3, "device": "cpu"}  # CPU: exact and comparable


@pytest.fixture(scope="module")
def crops():
    return T.Crops(names=("brick", "coffee"), crop=TINY["crop"])


def _hole(B, H, W, box):
    hole = torch.zeros(B, 1, H, W, dtype=torch.bool)
    y0, y1, x0, x1 = box
    hole[..., y0:y1, x0:x1] = True
    return hole


@pytest.mark.parametrize("mixer", ["psal", "conv", "full"])
def test_model_keeps_known_pixels_and_ignores_the_hole(mixer):
    torch.manual_seed(0)
    model = InpaintNet(mixer, width=6)
    x = torch.rand(2, 3, 22, 18, generator=gen(1))  # not a multiple of 4: padded and cropped
    hole = _hole(2, 22, 18, (5, 14, 4, 12))
    torch.manual_seed(3)
    out = model(x, hole)
    assert out.shape == x.shape
    assert torch.equal(out[~hole.expand_as(x)], x[~hole.expand_as(x)])
    # what was in the hole does not matter
    torch.manual_seed(3)
    other = model(torch.where(hole, torch.rand(2, 3, 22, 18, generator=gen(2)), x), hole)
    assert torch.equal(out, other)
    # gradients reach every parameter
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_psal_model_with_every_key_is_the_full_attention_model():
    """k = every allowed key makes PSAL's attention exact: the PSAL and full-attention models
    with the same weights give the same output (their state_dicts are interchangeable)."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8, generator=gen(4))
    hole = _hole(1, 8, 8, (0, 2, 0, 2))  # one half-resolution position unknown: 15 allowed keys
    full = InpaintNet("full", width=4).double()
    torch.nn.init.normal_(full.mixer.out.weight, std=0.5, generator=gen(5))  # zero at init: no effect
    ps = InpaintNet("psal", width=4, num_neighbors=15).double()
    ps.load_state_dict(full.state_dict())
    torch.testing.assert_close(ps(x.double(), hole), full(x.double(), hole), rtol=1e-9, atol=1e-9)
    conv = InpaintNet("conv", width=4).double()
    conv.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("mixer.")}, strict=False)
    assert not torch.allclose(conv(x.double(), hole), full(x.double(), hole))  # the mixer matters


def test_naive_full_attention_is_the_fused_one():
    """The materialised softmax (kept for memory comparisons) computes what psal.full_attention does."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 16, generator=gen(6)).double()
    hole = _hole(2, 12, 16, (2, 9, 3, 11))
    fused = InpaintNet("full", width=4).double()
    torch.nn.init.normal_(fused.mixer.out.weight, std=0.5, generator=gen(7))
    naive = InpaintNet("full", width=4, full_method="naive").double()
    naive.load_state_dict(fused.state_dict())
    torch.testing.assert_close(naive(x, hole), fused(x, hole), rtol=1e-9, atol=1e-9)


def test_bad_input_is_named():
    model = InpaintNet("conv", width=4)
    with pytest.raises(ValueError, match=r"mixer must be one of psal, conv, full, got 'unet'"):
        InpaintNet("unet")
    with pytest.raises(ValueError, match=r"image must have shape \(B, 3, H, W\), got \(1, 1, 8, 8\)"):
        model(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"hole must have shape \(B, 1, H, W\) = \(1, 1, 8, 8\).*got \(1, 1, 8, 9\)"):
        model(torch.rand(1, 3, 8, 8), torch.zeros(1, 1, 8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="hole must be a bool tensor"):
        model(torch.rand(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))


def test_holes_cover_a_fraction_and_never_nothing():
    holes = T.random_holes(64, 48, gen(0))
    frac = holes.float().mean((1, 2, 3))
    assert holes.shape == (64, 1, 48, 48) and (frac > 0).all() and frac.max() < 0.7
    assert 0.08 < float(frac.mean()) < 0.4


def test_resumed_training_continues_the_same_loss_curve(tmp_path, crops):
    opts = dict(TINY, steps=6, lr=3e-3, seed=1, data=crops, progress=False, log=lambda *a: None)
    whole = T.train_model("psal", checkpoint=str(tmp_path / "whole.pt"), **opts)
    part = str(tmp_path / "part.pt")
    first = T.train_model("psal", checkpoint=part, stop_after=3, **opts)
    assert len(first["losses"]) == 3 and T.load_checkpoint(part)["step"] == 3
    rest = T.train_model("psal", checkpoint=part, resume=True, **opts)
    assert len(rest["losses"]) == 6
    torch.testing.assert_close(torch.tensor(rest["losses"]), torch.tensor(whole["losses"]), rtol=1e-5, atol=1e-7)
    for a, b in zip(rest["model"].parameters(), whole["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the losses must move, or the comparison above proves little
    assert len(set(whole["losses"])) == 6
    # a checkpoint of other settings is refused, naming both; so is stopping before it
    with pytest.raises(ValueError, match="was made with"):
        T.train_model("psal", checkpoint=part, resume=True, **{**opts, "lr": 1e-3})
    with pytest.raises(ValueError, match="stop_after=2 is before the checkpoint's step 6"):
        T.train_model("psal", checkpoint=part, resume=True, stop_after=2, **opts)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1, got 0"):
        T.train_model("psal", checkpoint_every=0, **opts)


def test_checkpoint_loads_with_weights_only(tmp_path, crops):
    path = str(tmp_path / "m.pt")
    run = T.train_model("psal", steps=2, checkpoint=path, data=crops, progress=False, log=lambda *a: None, **TINY)
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"config", "model", "optimizer", "step", "losses", "data_rng", "torch_rng"}
    model = load_pretrained(path)
    for a, b in zip(model.parameters(), run["model"].parameters()):
        assert torch.equal(a, b)
    x = torch.rand(1, 1, 20, 20, generator=gen(0))
    hole = _hole(1, 20, 20, (4, 12, 4, 12))
    out = inpaint_with_model(x, hole, model)  # grayscale through the RGB model
    assert out.shape == x.shape and torch.equal(out[~hole], x[~hole])


# ----------------------------------------------------------------------------------------------
# Two processes.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        crops = T.Crops(names=("brick", "coffee"), crop=TINY["crop"])
        path = os.path.join(folder, "ddp.pt")
        run = T.train_model("psal", steps=3, checkpoint=path, data=crops, progress=False, log=lambda *a: None, **TINY)
        model = run["model"]
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        results = {"params_equal": all(torch.equal(every[0], f) for f in every)}

        # DDP's gradient is the mean of the ranks' own gradients, though each rank's search drew
        # its own random numbers on its own batch. (A fresh copy: the trained model's parameters
        # still carry the hooks of the DDP wrapper that trained them.)
        model = InpaintNet("psal", width=TINY["width"], num_neighbors=TINY["num_neighbors"])
        model.load_state_dict(run["model"].state_dict())
        g = torch.Generator().manual_seed(100 + rank)
        x = crops.sample(2, g)
        hole = T.random_holes(2, TINY["crop"], g)
        torch.manual_seed(50 + rank)
        T.hole_l1(model(x, hole), x, hole).backward()
        local = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(50 + rank)
        T.hole_l1(ddp(x, hole), x, hole).backward()
        averaged = torch.cat([p.grad.flatten() for p in model.parameters()])
        locals_ = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(locals_, local)
        results["local_grads_differ"] = not torch.allclose(locals_[0], locals_[1])
        mean = torch.stack(locals_).mean(0)
        results["grad_is_mean"] = torch.allclose(averaged, mean, rtol=1e-4, atol=1e-6)
        grads = [torch.empty_like(averaged) for _ in range(world)]
        dist.all_gather(grads, averaged)
        results["grads_equal"] = all(torch.equal(grads[0], a) for a in grads)

        # rank 0 wrote the checkpoint at the end of training; the other rank loads it
        dist.barrier()
        state = torch.load(path, map_location="cpu", weights_only=True)
        other = InpaintNet("psal", width=TINY["width"], num_neighbors=TINY["num_neighbors"])  # on CPU, like the run
        other.load_state_dict(state["model"])
        loaded = torch.cat([p.detach().flatten() for p in other.parameters()])
        results["checkpoint_loads"] = torch.equal(loaded, flat)
        results["losses_equal_across_ranks"] = state["losses"].tolist() == run["losses"]
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_stay_identical(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert results == {k: True for k in results}, (rank, results)
