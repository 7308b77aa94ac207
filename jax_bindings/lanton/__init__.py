"""lanton: the LANTON optimizer for JAX/optax, with fused XLA custom calls (Rust) on CPU.

    import optax, lanton
    tx = optax.chain(optax.clip_by_global_norm(1.0), lanton.lanton(learning_rate=0.02))
"""

from . import labels, reference
from ._config import StepConfig
from ._ffi import LibraryError, available as kernels_available, library_info, load_library
from ._fused import FusedLanton, fused
from ._options import DEFAULT_GROUPS, Group
from ._state import LantonState, layer_stats
from ._transform import lanton, paper
from .labels import DimSpec, default_labels

__version__ = "0.1.0"

__all__ = [
    "lanton", "paper", "fused", "layer_stats", "Group", "DimSpec", "LantonState", "FusedLanton", "StepConfig",
    "default_labels", "labels", "reference", "kernels_available", "library_info", "load_library",
    "LibraryError", "DEFAULT_GROUPS",
]
