"""psal: Patch-based Stochastic Attention for PyTorch.

``import psal`` needs only torch; compiled backends load on first use.
"""

from ._dispatch import available_backends, explain_search_backend  # noqa: F401 - the latter deprecated
from .functional import (
    attend,
    exact_knn,
    full_attention,
    patch_costs,
    patchmatch,
    ps_attention,
)
from .nn import PSALBlock, PSAttention
from .types import KNNField

__version__ = "0.1.0"

__all__ = [
    "KNNField",
    "PSALBlock",
    "PSAttention",
    "attend",
    "available_backends",
    "exact_knn",
    "full_attention",
    "patch_costs",
    "patchmatch",
    "ps_attention",
    "__version__",
]
