"""Train the colour network of :mod:`psal.apps.colour_net`: a gray frame coloured from a colour
reference frame through PSAL cross-attention, and its conv-only and full-attention twins with the
same data, steps and optimiser.

    python -m psal.examples.train_colorization                          # the three models, one after the other
    python -m psal.examples.train_colorization --models psal --minutes 30 --out runs/colour
    python -m psal.examples.train_colorization --models psal conv --steps 1200 --lr 5e-4 \
        --hand-features-from runs/colour --out runs/colour2     # the second stage
    python -m psal.examples.train_colorization --export runs/colour2/psal.pt src/psal/weights/colour_psal.pt

Data, made here, never from the pictures of the evaluation (``psal.apps.scenarios.EVAL_COLOUR``,
the photographs that ``python -m psal.bench apps`` and the video colour benchmark use): pairs
``(target, reference)`` of ``crop x crop`` windows of one source, the reference's window moved by
a known motion: a shift of up to a quarter of the window, a zoom of up to 15% either way, a
rotation of up to 10 degrees, in a third of the pairs a change of light (gain and gamma on the
reference), in a third an occlusion (a square of another source pasted into the target: content
the reference does not show), both flipped together half the time. Sources: scikit-image's stereo
pair (``motorcycle``; half of its pairs take the reference from the other eye's view: real
parallax) and ``colorwheel``, and its gray pictures (textures, a camera, a clock, coins, the moon,
cells, a page of text) each coloured with random palettes: their quantised, blurred luminance
levels take random colours, plus a smooth random chroma field. A network that colours by copying
the colours its matches point to does not need the colours of the world, only matching; a
network that paints colours it learnt by heart learns nothing it can use on new pictures here.

Two stages: the models are trained first on the luminance alone (``ColourNet(hand_features=
False)``), then given the zero-shot colorizer's luminance statistics as extra encoder inputs
(:func:`psal.apps.colour_net.with_hand_features`: zero weights for them at first, so the second
stage starts from what the first learnt) and trained on with ``--hand-features-from``. With the
statistics from the first step, the PSAL network learnt to match far worse (validation 21.5 dB at
4,000 steps against 23.6).

Loss: the mean squared error of the chroma (a, b in units of 100). Adam, cosine decay of the
learning rate. Every model gets the same batches (the same seed) and ``--steps`` steps (or as
many as ``--minutes`` allows, then that step count for the others). Each model's checkpoint is
``OUT/<model>.pt`` (``state_dict``, ``config``, the losses; ``torch.load(weights_only=True)``),
written at the end, atomically; ``OUT/report.json`` holds the curves.
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
import torch.nn.functional as F

from psal import images
from psal.apps.colorize import lab_from_rgb, rgb_from_lab
from psal.apps.colour_net import MIXERS, ColourNet, chroma_psnr_ab, load_pretrained, mse_ab, parameter_count, with_hand_features

COLOUR_SOURCES = ("motorcycle_left", "motorcycle_right", "colorwheel")
GRAY_SOURCES = ("brick", "grass", "gravel", "camera", "clock", "coins", "moon", "cell", "page", "text")
_PALETTES = 4  # random colourings of each gray source


@functools.cache
def load_source(name: str) -> torch.Tensor:
    """A training source ``(1, C, H, W)`` in ``[0, 1]`` (C = 3, or 1 for the gray ones)."""
    data = images._need("skimage.data", "demo")
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return images.to_tensor(left if name.endswith("left") else right)[:, :3]
    array = getattr(data, name)()
    pic = images.to_tensor(array)
    return pic[:, :3] if name in COLOUR_SOURCES else pic[:, :1] if pic.shape[1] == 1 else images.grayscale(pic[:, :3])


def random_colouring(gray: torch.Tensor, generator: torch.Generator, levels: int = 6) -> torch.Tensor:
    """``gray (1, 1, H, W)`` -> ``(1, 3, H, W)``: its luminance kept, its blurred luminance cut into
    ``levels`` quantile bands each of a random chroma, plus a smooth random chroma field."""
    H, W = gray.shape[-2:]
    L = lab_from_rgb(gray.expand(1, 3, H, W))[:, :1]
    blurred = F.avg_pool2d(F.pad(gray, (4, 4, 4, 4), mode="replicate"), 9, stride=1)
    edges = torch.quantile(blurred.flatten()[:: max(1, H * W // 20000)], torch.linspace(0, 1, levels + 1)[1:-1])
    band = torch.bucketize(blurred, edges)  # (1, 1, H, W) in [0, levels)
    palette = torch.randn(levels, 2, generator=generator) * 35
    ab = palette[band[0, 0]].permute(2, 0, 1)[None]
    field = torch.randn(1, 2, max(2, H // 96), max(2, W // 96), generator=generator) * 15
    ab = ab + F.interpolate(field, size=(H, W), mode="bicubic", align_corners=False)
    return rgb_from_lab(torch.cat([L, ab], 1))


def _window(pic: torch.Tensor, cy: float, cx: float, size: int, zoom: float = 1.0, angle: float = 0.0) -> torch.Tensor:
    """``(C, size, size)``: the window of ``pic (1, C, H, W)`` centred at pixel ``(cy, cx)``, each
    output pixel ``zoom`` source pixels, turned by ``angle`` radians (bilinear, border repeated)."""
    H, W = pic.shape[-2:]
    c, s = math.cos(angle) * zoom, math.sin(angle) * zoom
    theta = torch.tensor([[c * size / W, -s * size / W, (2 * cx + 1) / W - 1], [s * size / H, c * size / H, (2 * cy + 1) / H - 1]])
    grid = F.affine_grid(theta[None].to(pic.dtype), [1, pic.shape[1], size, size], align_corners=False)
    return F.grid_sample(pic, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


class Pairs:
    """Random training pairs: ``sample(batch, generator) -> (target (B, 3, S, S), reference (B, 3, S, S))``
    (the module docstring)."""

    def __init__(self, crop: int = 64, seed: int = 0):
        self.crop = crop
        g = torch.Generator().manual_seed(seed)
        self.sources: list[tuple[str, torch.Tensor]] = [(n, load_source(n)) for n in COLOUR_SOURCES]
        for name in GRAY_SOURCES:
            gray = load_source(name)
            self.sources += [(name, random_colouring(gray, g)) for _ in range(_PALETTES)]

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        S, g = self.crop, generator
        targets, references = [], []
        for _ in range(batch):
            u = torch.rand(12, generator=g).tolist()
            name, pic = self.sources[int(u[0] * len(self.sources))]
            H, W = pic.shape[-2:]
            margin = 0.75 * S
            cy = margin + u[1] * max(H - 2 * margin, 1)
            cx = margin + u[2] * max(W - 2 * margin, 1)
            target = _window(pic, cy, cx, S)
            ref_pic = pic
            if name.startswith("motorcycle_") and u[3] < 0.5:  # the other eye's view: real parallax
                ref_pic = load_source("motorcycle_right" if name.endswith("left") else "motorcycle_left")
            dy, dx = (u[4] - 0.5) * S / 2, (u[5] - 0.5) * S / 2
            zoom = math.exp((u[6] - 0.5) * 0.3)
            angle = (u[7] - 0.5) * math.radians(20)
            reference = _window(ref_pic, cy + dy, cx + dx, S, zoom, angle)
            if u[8] < 1 / 3:  # a change of light
                gamma, gain = math.exp((u[9] - 0.5) * 0.5), 0.85 + 0.3 * u[10]
                reference = (reference.clamp_min(0) ** gamma * gain).clamp(0, 1)
            if u[11] < 1 / 3:  # an occlusion: another source's square in the target
                _, other = self.sources[int(torch.randint(len(self.sources), (1,), generator=g))]
                side = S // 3 + int(torch.randint(S // 6 + 1, (1,), generator=g))
                oy, ox = (int(v) for v in torch.randint(0, S - side + 1, (2,), generator=g))
                oh, ow = other.shape[-2:]
                patch = _window(other, oh / 2, ow / 2, side)
                target = target.clone()
                target[:, oy : oy + side, ox : ox + side] = patch.expand(3, side, side)
            if torch.rand(1, generator=g).item() < 0.5:
                target, reference = target.flip(-1), reference.flip(-1)
            targets.append(target.expand(3, S, S))
            references.append(reference.expand(3, S, S))
        return torch.stack(targets).clamp(0, 1), torch.stack(references).clamp(0, 1)


def train(mixer: str, steps: int, batch: int, crop: int, lr: float, seed: int, device: torch.device, minutes: float | None,
          log_every: int = 50, init: ColourNet | None = None) -> tuple[ColourNet, dict]:  # fmt: skip
    """One model (``init``: go on training that one); returns it and its record (losses,
    validation curve, steps done, seconds)."""
    torch.manual_seed(seed)
    model = (ColourNet(mixer, hand_features=False) if init is None else init).to(device).train()
    if model.attention is not None:
        model.attention.generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = Pairs(crop, seed)
    g = torch.Generator().manual_seed(seed + 1)
    val_t, val_r = Pairs(crop, seed + 99).sample(32, torch.Generator().manual_seed(seed + 100))
    val_ab = lab_from_rgb(val_t)[:, 1:]
    record: dict = {"mixer": mixer, "parameters": parameter_count(model), "loss": [], "val_chroma_psnr_db": []}
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        target, reference = data.sample(batch, g)
        truth = lab_from_rgb(target)[:, 1:]
        loss = mse_ab(model(target.to(device), reference.to(device)), truth.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record["loss"].append(loss.item())
        step += 1
        if step % log_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                pred = torch.cat([model(val_t[i : i + 8].to(device), val_r[i : i + 8].to(device)).cpu() for i in range(0, 32, 8)])
            model.train()
            psnr = chroma_psnr_ab(pred, val_ab)
            record["val_chroma_psnr_db"].append([step, psnr])
            elapsed = time.perf_counter() - t0
            print(f"  {mixer} step {step}/{steps}: loss {sum(record['loss'][-log_every:]) / len(record['loss'][-log_every:]):.5f}, "
                  f"validation chroma PSNR {psnr:.2f} dB, {elapsed:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            if minutes is not None and elapsed > minutes * 60 and step < steps:
                steps = step  # out of time: stop here (the cosine schedule is cut short)
    record["steps"] = step
    record["seconds"] = time.perf_counter() - t0
    return model.eval(), record


def _save(path: str, model: ColourNet, record: dict) -> None:
    from psal.images import write_atomically

    def write(f):
        torch.save({"config": model.config, "model": model.state_dict(), "record": record}, f)

    write_atomically(path, write)


def export(checkpoint: str, dest: str) -> None:
    """The shipped weights: the checkpoint's ``config`` and ``state_dict`` only (float32)."""
    from psal.images import write_atomically

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = {k: v.float() if v.is_floating_point() else v for k, v in saved["model"].items()}
    write_atomically(dest, lambda f: torch.save({"config": saved["config"], "model": model}, f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.examples.train_colorization", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MIXERS), choices=MIXERS)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=None, help="stop the first model after this long; the others take as many steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="runs/colour")
    ap.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "DEST"), help="write the shipped weights of a checkpoint and stop")
    ap.add_argument("--hand-features-from", metavar="DIR",
                    help="the second stage: each model's checkpoint in DIR (a first run), given the hand features and trained on")  # fmt: skip
    args = ap.parse_args(argv)
    if args.export:
        export(*args.export)
        return 0
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    steps, minutes, report = args.steps, args.minutes, {}
    for mixer in args.models:
        init = None
        if args.hand_features_from:
            init = with_hand_features(load_pretrained(os.path.join(args.hand_features_from, f"{mixer}.pt")))
        model, record = train(mixer, steps, args.batch, args.crop, args.lr, args.seed, device, minutes, init=init)
        steps, minutes = record["steps"], None  # the same step budget for the twins
        _save(os.path.join(args.out, f"{mixer}.pt"), model, record)
        report[mixer] = {k: v for k, v in record.items() if k != "loss"} | {"loss_every_50": record["loss"][::50]}
        print(f"{mixer}: {record['parameters']} parameters, {record['steps']} steps in {record['seconds']:.0f} s, "
              f"validation chroma PSNR {record['val_chroma_psnr_db'][-1][1]:.2f} dB", flush=True)  # fmt: skip
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
