"""mlx-braces: LLM Braces (relevance-scored FFN sub-updates) for MLX and mlx-lm."""

# ruff: noqa: E402  (the BLAS must load before any import of mlx.core)
import sys
import types

from . import blas

blas.setup()  # before anything imports mlx.core: MLX binds its BLAS at import

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


class _Package(types.ModuleType):
    """Keeps ``mlx_braces.generate`` the function, as ``mlx_lm.generate`` is.

    Importing the ``mlx_braces.generate`` CLI module would otherwise rebind the
    package's ``generate`` to that module (the import system sets it on the parent),
    so ``from mlx_braces import generate`` would depend on import order. The module
    itself stays in ``sys.modules`` (``importlib.import_module`` returns it).
    """

    def __setattr__(self, name: str, value) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            super().__setattr__("stream_generate", value.stream_generate)
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
