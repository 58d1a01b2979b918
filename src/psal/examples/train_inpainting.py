"""Train the inpainting network of :mod:`psal.apps.inpaint_net`: a PSAL model, and a conv-only and
a full-attention model of the same size for comparison.

    python -m psal.examples.train_inpainting                        # the three models, one process
    python -m psal.examples.train_inpainting --models psal --steps 2000 --out runs/psal
    torchrun --nproc_per_node 2 -m psal.examples.train_inpainting   # data-parallel (DDP)
    python -m psal.examples.train_inpainting --export runs/inpainting/psal.pt src/psal/weights/inpaint_psal.pt

Data: random ``crop x crop`` crops of scikit-image's bundled pictures (textures, photographs,
microscopy, astronomy; the longer side shrunk to at most 512), randomly flipped, with holes of
random rectangles and ellipses (about 10-35% of the area). Only the left three quarters of each
training picture are ever cropped for training.

Held-out set, fixed by ``--seed``: ``--eval-crop`` squares from the right quarter of every
training picture (unseen pixels of seen kinds of picture) and from three pictures never trained
on (astronaut, chelsea, camera), each with its own hole. The score is the PSNR inside the hole.

Loss: L1 inside the hole. Adam, cosine learning-rate decay. Each model's checkpoint is
``OUT/<model>.pt`` (a dict of the ``state_dict``, the optimizer's, the step, the random states and
the losses so far; read back with ``torch.load(weights_only=True)``), written every
``--checkpoint-every`` steps and at the end, atomically; ``--resume`` continues from it the same
loss curve as an uninterrupted run. Under ``torchrun`` every rank draws its own batches (the seed
plus its rank) and :class:`torch.nn.parallel.DistributedDataParallel` averages the gradients
(``gloo`` on CPU, ``nccl`` on CUDA); rank 0 writes the checkpoints and the report.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from psal import images
from psal.apps.inpaint_net import MIXERS, InpaintNet, hole_l1

TRAIN_IMAGES = (
    "brick", "grass", "gravel", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "coins", "moon", "cell",
)  # fmt: skip
HELD_OUT_IMAGES = ("astronaut", "chelsea", "camera")


# ----------------------------------------------------------------------------------------------
# Data.


@functools.cache
def load_picture(name: str, longest: int = 512) -> torch.Tensor:
    """A bundled scikit-image picture as ``(1, 3, H, W)`` in ``[0, 1]``, its longer side at most
    ``longest``. Cached: treat the result as read-only."""
    return images.load_bundled(name, longest=longest)


def random_holes(batch: int, size: int, generator: torch.Generator, shapes: int = 4) -> torch.Tensor:
    """``(B, 1, S, S)`` bool: per sample, ``shapes`` random rectangles or ellipses (each a
    tenth to a third of the side), about 10-35% of the area in all; never empty."""
    g = generator
    u = torch.rand(batch, shapes, 5, generator=g)
    centre = u[..., :2] * size
    half = (0.06 + 0.14 * u[..., 2:4]) * size
    ellipse = u[..., 4] < 0.5
    yy = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1) + 0.5
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size) + 0.5
    dy = (yy - centre[..., 0, None, None]) / half[..., 0, None, None]
    dx = (xx - centre[..., 1, None, None]) / half[..., 1, None, None]
    inside = torch.where(ellipse[..., None, None], dy.square() + dx.square() <= 1, (dy.abs() <= 1) & (dx.abs() <= 1))
    hole = inside.any(1, keepdim=True)
    # A sample whose shapes all fell off the map gets a square in the middle.
    c, r = size // 2, max(1, size // 8)
    empty = ~hole.flatten(1).any(1)
    hole[empty, :, c - r : c + r, c - r : c + r] = True
    return hole


class Crops:
    """Random training crops: ``sample(batch, generator) -> (B, 3, crop, crop)``."""

    def __init__(self, names=TRAIN_IMAGES, crop: int = 64):
        self.crop = crop
        self.pictures = []
        for name in names:
            pic = load_picture(name)
            region = pic[..., : pic.shape[-1] * 3 // 4]  # the right quarter is held out
            if min(region.shape[-2:]) >= crop:
                self.pictures.append(region)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        which = torch.randint(len(self.pictures), (batch,), generator=generator).tolist()
        u = torch.rand(batch, 4, generator=generator)
        crops = []
        for i, (fy, fx) in zip(which, u[:, :2].tolist()):
            pic = self.pictures[i]
            top = int(fy * (pic.shape[-2] - self.crop + 1))
            left = int(fx * (pic.shape[-1] - self.crop + 1))
            crops.append(pic[0, :, top : top + self.crop, left : left + self.crop])
        x = torch.stack(crops)
        x = torch.where((u[:, 2] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        return torch.where((u[:, 3] < 0.5).view(-1, 1, 1, 1), x.flip(-2), x)


def held_out_set(crop: int = 96, per_picture: int = 2, seed: int = 0):
    """Fixed ``(images (N, 3, crop, crop), holes (N, 1, crop, crop))``: crops of the held-out right
    quarter of every training picture and of the pictures never trained on."""
    g = torch.Generator().manual_seed(10_000 + seed)
    sources = []
    for name in TRAIN_IMAGES:
        pic = load_picture(name)
        sources.append(pic[..., pic.shape[-1] * 3 // 4 :])
    sources += [load_picture(name) for name in HELD_OUT_IMAGES]
    crops = []
    for pic in sources:
        H, W = pic.shape[-2:]
        if H < crop or W < crop:
            pic = images.resize(pic, (max(H, crop), max(W, crop)))
            H, W = pic.shape[-2:]
        for fy, fx in torch.rand(per_picture, 2, generator=g).tolist():
            y, x = int(fy * (H - crop + 1)), int(fx * (W - crop + 1))
            crops.append(pic[0, :, y : y + crop, x : x + crop])
    imgs = torch.stack(crops)
    return imgs, random_holes(len(crops), crop, g)


@torch.no_grad()
def evaluate(model, imgs, holes, batch: int = 8) -> float:
    """Mean over the held-out crops of the PSNR (dB) inside each crop's hole."""
    was = model.training
    model.eval()
    scores = []
    device = next(model.parameters()).device
    for i in range(0, len(imgs), batch):
        x, h = imgs[i : i + batch].to(device), holes[i : i + batch].to(device)
        out = model(x, h)
        hh = h.expand_as(out).to(out.dtype)
        mse = ((out - x).square() * hh).flatten(1).sum(1) / hh.flatten(1).sum(1)
        scores.append(10 * torch.log10(1 / mse.clamp_min(1e-12)))
    model.train(was)
    return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------------------------
# Distributed set-up.


def distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group when launched by ``torchrun``: ``nccl``
    for a CUDA ``device``, else ``gloo``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(name: str | None) -> torch.device:
    """``name``, else the local CUDA device (``LOCAL_RANK`` under torchrun) when there is one, else cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images.write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def export_weights(checkpoint: str, dest: str) -> None:
    """The model of a training checkpoint, without the optimizer's state: ``{"config", "model"}``
    (what ships as ``psal/weights/inpaint_psal.pt``), the tensors as float32."""
    state = load_checkpoint(checkpoint)
    model = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(dest, {"config": state["config"], "model": model, "step": state["step"]})


# ----------------------------------------------------------------------------------------------
# Training.


def train_model(
    mixer: str,
    *,
    steps: int = 600,
    batch: int = 8,
    crop: int = 64,
    width: int = 24,
    num_neighbors: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    checkpoint: str | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    stop_after: int | None = None,
    data: Crops | None = None,
    device: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train one model; returns ``{"model", "losses", "seconds", "steps"}`` (the model unwrapped).

    ``stop_after``: stop (with a checkpoint) after this many steps of the schedule of ``steps``,
    as an interrupted run would; ``resume`` continues from ``checkpoint``.
    """
    for name, value, least in (("steps", steps, 1), ("batch", batch, 1), ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"train_model: {name} must be an int >= {least}, got {value!r}")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"train_model: stop_after must be an int >= 0 or None, got {stop_after!r}")
    dev = _device(device)
    rank, world = distributed(dev)
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = InpaintNet(mixer, width=width, num_neighbors=num_neighbors).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    data = data if data is not None else Crops(crop=crop)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # batches: each rank its own
    torch.manual_seed(seed * 1000 + 7 + rank)  # the search's random draws: each rank its own
    start, losses = 0, []
    config = {"mixer": mixer, "width": width, "num_neighbors": num_neighbors, "crop": crop, "batch": batch,
              "lr": lr, "steps": steps, "seed": seed, "world_size": world}  # fmt: skip
    found = bool(resume and checkpoint and os.path.isfile(checkpoint))
    if world > 1:  # every rank must resume, or none: they would run different numbers of steps
        every = [None] * world
        dist.all_gather_object(every, found)
        if len(set(every)) > 1:
            raise ValueError(f"train_model: checkpoint {checkpoint!r} exists for ranks {[r for r, f in enumerate(every) if f]} "
                             f"only; put it where every rank sees it")  # fmt: skip
    if found and checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if state["config"] != config:
            raise ValueError(f"train_model: checkpoint {checkpoint!r} was made with {state['config']}, not {config}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"].tolist()
        gen.set_state(state["data_rng"][rank])
        torch.set_rng_state(state["torch_rng"][rank])
        log(f"[{mixer}] resumed at step {start} from {checkpoint}")
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def gather_states():
        states = (gen.get_state(), torch.get_rng_state())
        if world == 1:
            return [states[0]], [states[1]]
        every: list = [None] * world
        dist.all_gather_object(every, states)
        return [s[0] for s in every], [s[1] for s in every]

    def save(step):
        data_rng, torch_rng = gather_states()
        if rank == 0 and checkpoint:
            save_checkpoint(checkpoint, {
                "config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "losses": torch.tensor(losses),
                "data_rng": data_rng, "torch_rng": torch_rng,
            })  # fmt: skip

    end = steps if stop_after is None else min(steps, stop_after)
    if end < start:
        raise ValueError(f"train_model: stop_after={stop_after} is before the checkpoint's step {start}")
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=mixer, leave=False, file=sys.stderr)
    t0 = time.perf_counter()
    net.train()
    for step in range(start, end):
        x = data.sample(batch, gen).to(dev)
        hole = random_holes(batch, x.shape[-1], gen).to(dev)
        loss = hole_l1(net(x, hole), x, hole)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mean_loss = loss.detach()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < end:
            save(step + 1)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if checkpoint:
        save(end)
    return {"model": model, "losses": losses, "seconds": seconds, "steps": end}


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.examples.train_inpainting", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MIXERS), choices=MIXERS)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8, help="per process")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--eval-crop", type=int, default=96)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--k", type=int, default=4, help="neighbours of the PSAL block")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/inpainting", help="folder of the checkpoints and report.json")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/<model>.pt where it exists")
    ap.add_argument("--device", help="default: the (local rank's) CUDA device where there is one, else cpu")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "DEST"), help="write CHECKPOINT's weights alone to DEST and stop")
    args = ap.parse_args(argv)
    if args.export:
        export_weights(*args.export)
        print(f"wrote {args.export[1]}")
        return 0

    rank, world = distributed(_device(args.device))
    log = print if rank == 0 else (lambda *a, **k: None)
    data = Crops(crop=args.crop)
    imgs, holes = held_out_set(args.eval_crop, seed=args.seed)
    log(f"{world} process(es), batch {args.batch} each; {len(data.pictures)} training pictures; "
        f"held-out: {len(imgs)} crops of {args.eval_crop}x{args.eval_crop}")  # fmt: skip
    report = {}
    for mixer in args.models:
        result = train_model(
            mixer, steps=args.steps, batch=args.batch, crop=args.crop, width=args.width, num_neighbors=args.k,
            lr=args.lr, seed=args.seed, checkpoint=os.path.join(args.out, f"{mixer}.pt"),
            checkpoint_every=args.checkpoint_every, resume=args.resume, data=data, device=args.device,
            progress=not args.quiet, log=log,
        )  # fmt: skip
        psnr = evaluate(result["model"], imgs, holes) if rank == 0 else float("nan")
        last = result["losses"][-50:]
        report[mixer] = {"parameters": num_parameters(result["model"]), "steps": result["steps"],
                         "seconds": result["seconds"], "final_loss": sum(last) / max(1, len(last)),
                         "held_out_hole_psnr_db": psnr}  # fmt: skip
        log(f"[{mixer}] {report[mixer]['parameters']} parameters, {result['steps']} steps in "
            f"{result['seconds']:.0f} s, loss {report[mixer]['final_loss']:.4f}, held-out hole PSNR {psnr:.2f} dB")  # fmt: skip
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump({"args": vars(args), "world_size": world, "torch": torch.__version__, "models": report}, f, indent=1)
        log("\n| model | parameters | steps | seconds | held-out hole PSNR dB |\n|---|---|---|---|---|")
        for m, r in report.items():
            log(f"| {m} | {r['parameters']:,} | {r['steps']} | {r['seconds']:.0f} | {r['held_out_hole_psnr_db']:.2f} |")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
