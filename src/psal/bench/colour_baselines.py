"""Exemplar-colorization baselines for the benchmark: the classic methods that PSAL's
``psal.apps.colorize.colorize`` is compared against. Benchmark peers, not library features: this
module uses numpy and scipy (``scipy.sparse``) and is not imported by ``import psal``.

Every method follows ``colorize``'s conventions: a grayscale target ``(1, 1, H, W)`` in ``[0, 1]``
(read as sRGB gray), a colour reference ``(1, 3, Hr, Wr)`` in ``[0, 1]``, and an RGB result
``(1, 3, H, W)`` in ``[0, 1]`` whose CIE Lab luminance is the target's (up to the gamut clipping
of ``rgb_from_lab``); only a and b are chosen by the method.

- ``mean_colour``: the reference's mean a, b on the target's L (the simplest baseline).
- ``welsh``: Welsh, Ashikhmin and Mueller 2002, "Transferring color to greyscale images", the
  global matching variant: luminance remapping, jittered samples of the reference described by
  luminance and neighbourhood standard deviation, and each target pixel takes the chroma of its
  best sample.
- ``levin_propagate``: Levin, Lischinski and Weiss 2004, "Colorization using optimization": a, b
  given at scribbled pixels, propagated to the others by a sparse linear system whose affinities
  follow the target's intensity (affinities as sharp as the authors' released code by default,
  sharper than the paper's text reads; see ``var_scale``).
- ``welsh_levin``: Welsh's colours kept at a confident subset of pixels, propagated by Levin.

Computations run in float64 (numpy/scipy for Levin's system); the result comes back in float64
for a float64 target and float32 otherwise.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from psal import _checks as checks
from psal.apps.colorize import global_transfer, lab_from_rgb, rgb_from_lab

__all__ = ["mean_colour", "welsh", "levin_propagate", "welsh_levin"]

# Welsh's matching: at most this many (target pixel, sample) costs held at once.
_COST_BUDGET = 1 << 22
# Levin: the floor on sigma_r^2 (Y in [0, 1]), so flat windows get a finite sigma; and sigma_r^2
# over the window's variance (see levin_propagate: the paper reads 1, the authors' code 0.3).
_VAR_FLOOR = 2e-6
_VAR_SCALE = 0.3


# ----------------------------------------------------------------------------- shared helpers


def _check_gray(gray, name: str) -> None:
    if not isinstance(gray, torch.Tensor) or not gray.is_floating_point():
        raise TypeError(f"{name}: gray must be a floating-point tensor, got {type(gray).__name__}")
    if gray.dim() != 4 or gray.shape[0] != 1 or gray.shape[1] != 1:
        raise ValueError(f"{name}: gray must be (1, 1, H, W), got {tuple(gray.shape)}")


def _check_reference(reference, name: str) -> None:
    if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
        raise TypeError(f"{name}: reference must be a floating-point tensor, got {type(reference).__name__}")
    if reference.dim() != 4 or reference.shape[0] != 1 or reference.shape[1] != 3:
        raise ValueError(f"{name}: reference must be (1, 3, Hr, Wr), got {tuple(reference.shape)}")


def _out_dtype(gray: torch.Tensor) -> torch.dtype:
    return torch.float64 if gray.dtype == torch.float64 else torch.float32


def _target_luma(gray: torch.Tensor) -> torch.Tensor:
    """The target's Lab L ``(1, 1, H, W)`` in float64: ``lab_from_rgb`` of the gray read as RGB."""
    g = gray.double()
    return lab_from_rgb(g.expand(1, 3, *g.shape[-2:]))[:, :1]


def _compose(L: torch.Tensor, ab: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RGB ``(1, 3, H, W)`` of the Lab made of ``L (1, 1, H, W)`` and ``ab (1, 2, H, W)``."""
    return rgb_from_lab(torch.cat([L.double(), ab.to(L.device, torch.float64)], 1)).to(dtype)


def _local_std(L: torch.Tensor, window: int) -> torch.Tensor:
    """Population standard deviation of ``L (1, 1, H, W)`` over the ``window x window``
    neighbourhood of each pixel, the neighbourhood clipped to the image."""
    x = L - L.mean()  # centred: E[x^2] - E[x]^2 cancels less
    r = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=r, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=r, count_include_pad=False)
    return (mean_sq - mean * mean).clamp_min(0).sqrt()


def _check_window(window, name: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"{name}: window must be a positive odd int, got {window!r}")


def _check_var_scale(var_scale, name: str) -> None:
    if isinstance(var_scale, bool) or not isinstance(var_scale, (int, float)) or not var_scale > 0:
        raise ValueError(f"{name}: var_scale must be a positive number, got {var_scale!r}")


# ----------------------------------------------------------------------------- mean colour


def mean_colour(gray: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The reference's mean Lab a and b laid on the target's luminance: ``(1, 3, H, W)``. This is
    ``psal.apps.colorize.global_transfer`` on a gray target, whose a and b have no spread."""
    _check_gray(gray, "mean_colour")
    _check_reference(reference, "mean_colour")
    return global_transfer(gray.double(), reference.double()).to(_out_dtype(gray))


# ----------------------------------------------------------------------------- Welsh et al. 2002


def _jittered_grid(Hr: int, Wr: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of about ``samples`` positions: one uniformly random position in
    each cell of a ``gh x gw`` grid over the reference (``gh / gw`` about ``Hr / Wr``)."""
    gh = min(Hr, max(1, round((samples * Hr / Wr) ** 0.5)))
    gw = min(Wr, max(1, round(samples / gh)))
    rng = np.random.default_rng(seed)
    ey = np.linspace(0, Hr, gh + 1)  # cell edges; every cell holds at least one pixel
    ex = np.linspace(0, Wr, gw + 1)
    cy = np.repeat(np.arange(gh), gw)
    cx = np.tile(np.arange(gw), gh)
    lo_y, hi_y = np.ceil(ey[cy]).astype(int), np.ceil(ey[cy + 1]).astype(int)
    lo_x, hi_x = np.ceil(ex[cx]).astype(int), np.ceil(ex[cx + 1]).astype(int)
    iy = lo_y + np.floor(rng.random(gh * gw) * (hi_y - lo_y)).astype(int)
    ix = lo_x + np.floor(rng.random(gh * gw) * (hi_x - lo_x)).astype(int)
    return np.minimum(iy, hi_y - 1), np.minimum(ix, hi_x - 1)


def _welsh_lab(gray, reference, samples, window, seed, chunk=None, remap=True):
    """Welsh's matching. Returns the target's L ``(1, 1, H, W)``, the matched a, b
    ``(1, 2, H, W)`` and each pixel's best matching error ``(H, W)``, all float64."""
    L = _target_luma(gray)
    ref = lab_from_rgb(reference.double())
    Lr = ref[:, :1]
    # (a) Luminance remapping: the reference's L moved linearly to the target's mean and spread.
    if remap:
        Lr = (Lr - Lr.mean()) * (L.std(unbiased=False) / Lr.std(unbiased=False).clamp_min(1e-12)) + L.mean()
    sd_t, sd_r = _local_std(L, window), _local_std(Lr, window)
    # (b) Jittered samples of the reference: (remapped) luminance, neighbourhood std, chroma.
    jy, jx = _jittered_grid(Lr.shape[-2], Lr.shape[-1], samples, seed)
    iy, ix = torch.from_numpy(jy).to(L.device), torch.from_numpy(jx).to(L.device)
    s_L, s_sd, s_ab = Lr[0, 0, iy, ix], sd_r[0, 0, iy, ix], ref[0, 1:, iy, ix]  # (S,), (S,), (2, S)
    # (c) Each target pixel: the sample minimising 0.5 dL^2 + 0.5 dstd^2, in chunks of pixels.
    t_L, t_sd = L.reshape(-1), sd_t.reshape(-1)
    n = t_L.numel()
    chunk = chunk or max(1, _COST_BUDGET // s_L.numel())
    err = torch.empty(n, dtype=torch.float64, device=L.device)
    best = torch.empty(n, dtype=torch.long, device=L.device)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        cost = 0.5 * (t_L[c0:c1, None] - s_L[None]).square() + 0.5 * (t_sd[c0:c1, None] - s_sd[None]).square()
        err[c0:c1], best[c0:c1] = cost.min(1)
    H, W = L.shape[-2:]
    ab = s_ab[:, best].reshape(1, 2, H, W)
    return L, ab, err.reshape(H, W)


def welsh(
    gray: torch.Tensor, reference: torch.Tensor, samples: int = 200, window: int = 5, seed: int = 0, remap: bool = True
) -> torch.Tensor:
    """Welsh et al. 2002, global matching: colour ``gray (1, 1, H, W)`` like ``reference
    (1, 3, Hr, Wr)`` -> ``(1, 3, H, W)``.

    The reference's L is remapped linearly to the target's mean and standard deviation (the
    paper's step; ``remap=False`` skips it, the stronger variant when reference and target share
    their light, as two halves of one photograph do: see BENCHMARKS.md); about
    ``samples`` positions of the reference on a jittered grid (random generator seeded by
    ``seed``) are each described by their remapped L and the standard deviation of L in the
    ``window x window`` neighbourhood; every target pixel takes the a, b of the sample minimising
    ``0.5 * dL^2 + 0.5 * dstd^2`` (the paper's equal weights) and keeps its own L. The costs are
    computed in chunks of pixels, at most about four million at once.
    """
    _check_gray(gray, "welsh")
    _check_reference(reference, "welsh")
    _check_window(window, "welsh")
    checks.check_int("welsh", "samples", samples, 1)
    checks.check_bool("welsh", "remap", remap)
    L, ab, _ = _welsh_lab(gray, reference, samples, window, seed, remap=remap)
    return _compose(L, ab, _out_dtype(gray))


# ----------------------------------------------------------------------------- Levin et al. 2004


def _levin_matrix(Y: np.ndarray, scribbled: np.ndarray, window: int, var_scale: float) -> scipy.sparse.csc_matrix:
    """Levin's system matrix for intensity ``Y (H, W)``: row r is ``U(r) - sum_s w_rs U(s)`` for
    unscribbled r, the identity for scribbled r. ``w_rs`` is ``exp(-(Y(r) - Y(s))^2 / (2 var_r))``
    over the other pixels s of r's window (clipped to the image), ``var_r`` ``var_scale`` times
    the variance of Y in that window (r included), floored at ``_VAR_FLOOR``; each row's weights
    are normalised to sum to 1."""
    H, W = Y.shape
    n = H * W
    rad = window // 2
    idx = np.arange(n).reshape(H, W)
    offsets = [(dy, dx) for dy in range(-rad, rad + 1) for dx in range(-rad, rad + 1)]

    def valid(dy, dx):  # the r whose neighbour r + (dy, dx) lies in the image, and the neighbours
        r = (slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx)))
        s = (slice(max(0, dy), H - max(0, -dy)), slice(max(0, dx), W - max(0, -dx)))
        return r, s

    # The window's mean and variance by sums over the shifts (clipped window: its own count).
    Yc = Y - Y.mean()
    s1, s2, cnt = np.zeros_like(Y), np.zeros_like(Y), np.zeros_like(Y)
    for dy, dx in offsets:
        r, s = valid(dy, dx)
        s1[r] += Yc[s]
        s2[r] += Yc[s] ** 2
        cnt[r] += 1
    var = np.maximum(var_scale * (s2 / cnt - (s1 / cnt) ** 2), _VAR_FLOOR)

    rows, cols, vals = [], [], []
    for dy, dx in offsets:
        if dy == 0 and dx == 0:
            continue
        r, s = valid(dy, dx)
        rows.append(idx[r].ravel())
        cols.append(idx[s].ravel())
        vals.append(np.exp(-((Y[r] - Y[s]) ** 2) / (2 * var[r])).ravel())
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    total = np.bincount(rows, weights=vals, minlength=n)
    free = ~scribbled.ravel()[rows]  # scribbled rows keep only their diagonal
    rows, cols = rows[free], cols[free]
    vals = -vals[free] / np.maximum(total[rows], 1e-300)
    rows = np.concatenate([rows, np.arange(n)])
    cols = np.concatenate([cols, np.arange(n)])
    vals = np.concatenate([vals, np.ones(n)])
    return scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(n, n))


def _levin_ab(Y: np.ndarray, ab: np.ndarray, scribbled: np.ndarray, window: int, var_scale: float = _VAR_SCALE) -> np.ndarray:
    """Levin's solve: ``ab (2, H, W)`` given where ``scribbled (H, W)`` -> the propagated
    ``(2, H, W)`` (a and b share one LU factorisation)."""
    H, W = Y.shape
    A = _levin_matrix(Y, scribbled, window, var_scale)
    rhs = np.where(scribbled.ravel()[:, None], ab.reshape(2, -1).T, 0.0)
    out = scipy.sparse.linalg.splu(A).solve(np.ascontiguousarray(rhs))
    return out.T.reshape(2, H, W)


def levin_propagate(
    gray: torch.Tensor,
    scribble_ab: torch.Tensor,
    scribbled: torch.Tensor,
    window: int = 3,
    var_scale: float = _VAR_SCALE,
) -> torch.Tensor:
    """Levin et al. 2004: the Lab a, b of ``scribble_ab (1, 2, H, W)`` at the pixels where
    ``scribbled`` (bool, ``(1, 1, H, W)`` or ``(H, W)``) is true, propagated over ``gray
    (1, 1, H, W)`` -> RGB ``(1, 3, H, W)`` with the target's L and the propagated a, b.

    For each of a and b, U solves ``U(r) - sum_{s in N(r)} w_rs U(s) = 0`` at every unscribbled r
    (the zero of the paper's quadratic cost) and ``U(r) = scribble(r)`` at the scribbled ones,
    with ``N(r)`` the other pixels of r's ``window x window`` window (clipped to the image) and
    ``w_rs`` proportional to ``exp(-(Y(r) - Y(s))^2 / (2 sigma_r^2))``, each row's weights summing
    to 1. Y is the gray value in ``[0, 1]`` (the Y of YIQ for a gray image), and ``sigma_r^2`` is
    ``var_scale`` times the variance of Y in r's window (r included), floored at 2e-6.

    ``var_scale``: the paper's text reads as 1, but then a sharp step leaks colour: in a window
    straddling a step, a fraction p of it across, the variance is ``p (1 - p) d^2`` for a step of
    height d, so the weight across is ``exp(-1 / (2 p (1 - p)))`` (0.1 for p = 1/3) whatever the
    step's contrast; with scribbles 16 pixels from the step on either side, the colour at the step
    is then a third of the way to the other side's. The authors' released implementation uses ``exp(-dY^2 / (0.6 var))``, which is
    ``var_scale = 0.3`` (weight across 6e-4): the default here.

    One sparse LU factorisation (scipy's SuperLU) serves a and b; its cost grows faster than the
    pixel count, so this is for targets of up to a megapixel or so.
    """
    _check_gray(gray, "levin_propagate")
    _check_window(window, "levin_propagate")
    _check_var_scale(var_scale, "levin_propagate")
    H, W = gray.shape[-2:]
    if not isinstance(scribble_ab, torch.Tensor) or tuple(scribble_ab.shape) != (1, 2, H, W):
        raise ValueError(f"levin_propagate: scribble_ab must be (1, 2, {H}, {W}), got {getattr(scribble_ab, 'shape', None)}")
    if not isinstance(scribbled, torch.Tensor) or scribbled.dtype != torch.bool or scribbled.numel() != H * W:
        raise ValueError(f"levin_propagate: scribbled must be a bool tensor of {H} x {W} pixels")
    mask = scribbled.reshape(H, W).cpu().numpy()
    if not mask.any():
        raise ValueError("levin_propagate: at least one pixel must be scribbled")
    Y = gray[0, 0].detach().double().cpu().numpy()
    ab = _levin_ab(Y, scribble_ab[0].detach().double().cpu().numpy(), mask, window, var_scale)
    return _compose(_target_luma(gray), torch.from_numpy(ab)[None].to(gray.device), _out_dtype(gray))


# ----------------------------------------------------------------------------- Welsh then Levin


def _confident(err: torch.Tensor, grid: int, keep: float) -> torch.Tensor:
    """Bool ``(H, W)``: the pixels of a regular grid of spacing ``grid`` (offset ``grid // 2``)
    whose Welsh matching error is at most the ``keep`` quantile of the grid pixels' errors."""
    on_grid = torch.zeros_like(err, dtype=torch.bool)
    on_grid[grid // 2 :: grid, grid // 2 :: grid] = True
    threshold = np.quantile(err[on_grid].cpu().numpy(), keep)
    return on_grid & (err <= threshold)


def welsh_levin(
    gray: torch.Tensor,
    reference: torch.Tensor,
    samples: int = 200,
    window: int = 5,
    seed: int = 0,
    grid: int = 4,
    keep: float = 0.5,
    levin_window: int = 3,
    var_scale: float = _VAR_SCALE,
    remap: bool = True,
) -> torch.Tensor:
    """Welsh et al.'s matching, then Levin et al.'s propagation: ``(1, 3, H, W)``.

    ``welsh`` colours every pixel independently, so its chroma is noisy where several samples
    match about equally well. Only a confident subset is kept as scribbles, and Levin's
    propagation fills the rest along the target's own luminance structure.

    Confident pixels: those of a regular grid of spacing ``grid`` (default 4, one pixel in 16)
    whose best matching error is in the lowest ``keep`` fraction (default half) of the grid
    pixels' errors, so about ``1 / (2 * grid^2)`` of the pixels (3 % by default). The grid keeps
    the scribbles spread over the image and sparse, so propagation (not the per-pixel matches)
    decides the colour between them, and the error rule drops the matches that fit worst, where
    the target's luminance and texture statistics have no close counterpart among the samples.
    ``levin_window`` and ``var_scale`` go to the propagation (see ``levin_propagate``);
    ``remap`` to the matching (see ``welsh``).
    """
    _check_gray(gray, "welsh_levin")
    _check_reference(reference, "welsh_levin")
    _check_window(window, "welsh_levin")
    _check_window(levin_window, "welsh_levin")
    _check_var_scale(var_scale, "welsh_levin")
    checks.check_int("welsh_levin", "grid", grid, 1)
    checks.check_int("welsh_levin", "samples", samples, 1)
    checks.check_bool("welsh_levin", "remap", remap)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"welsh_levin: keep must be in [0, 1], got {keep!r}")
    _, ab, err = _welsh_lab(gray, reference, samples, window, seed, remap=remap)
    return levin_propagate(gray, ab, _confident(err, grid, keep), levin_window, var_scale)
