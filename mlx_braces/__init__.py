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
    "generate",
    "load",
    "load_adapter",
    "orthonormalize",
    "print_trainable_parameters",
    "save_adapter",
    "stream_generate",
]


def __getattr__(name: str):
    """``generate``/``stream_generate`` import mlx-lm's generation code on first use."""
    if name in ("generate", "stream_generate"):
        import importlib

        module = importlib.import_module(".generate", __name__)
        globals().update(
            generate=module.generate, stream_generate=module.stream_generate
        )
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
