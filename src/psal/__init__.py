"""psal: Patch-based Stochastic Attention for PyTorch.

``import psal`` needs only torch; compiled backends load on first use.
"""

from ._dispatch import explain_search_backend
from .functional import exact_knn, patch_costs, patchmatch
from .types import KNNField

__version__ = "0.1.0"

__all__ = ["KNNField", "exact_knn", "explain_search_backend", "patch_costs", "patchmatch", "__version__"]
