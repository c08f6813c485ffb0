"""mlx-braces: LLM Braces (relevance-scored FFN sub-updates) for MLX and mlx-lm."""

from ._version import __version__
from .adapters import AdapterError, load, load_adapter, save_adapter
from .braces import (
    BracedFFN,
    apply_braces,
    braced_layers,
    orthonormalize,
    print_trainable_parameters,
)

__all__ = [
    "AdapterError",
    "BracedFFN",
    "__version__",
    "apply_braces",
    "braced_layers",
    "load",
    "load_adapter",
    "orthonormalize",
    "print_trainable_parameters",
    "save_adapter",
]
