"""Result types shared by every backend."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KNNField(NamedTuple):
    """A k-nearest-neighbour field between query patches and key patches.

    Attributes:
        indices: ``Tensor[B, heads, k, H, W]`` of int64. Entry ``[b, h, j, y, x]`` is the flat key
            position ``row * Wk + col`` of the ``j``-th best match of query pixel ``(y, x)``.
            The ``k`` positions of one query pixel are distinct and allowed by the key mask.
        costs: ``Tensor[B, heads, k, H, W]`` of float32, the patch cost of each match, ascending
            along the ``k`` axis. A cost that is not a number (NaN in the inputs) reads ``+inf``.
    """

    indices: torch.Tensor
    costs: torch.Tensor
