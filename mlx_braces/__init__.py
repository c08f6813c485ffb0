"""mlx-braces: LLM Braces (relevance-scored FFN sub-updates) for MLX and mlx-lm.

The public API (see the README's "Python API"): brace a model, load and save adapters,
train, steer and generate. Everything else is reachable from its module.
"""

# ruff: noqa: E402  (the BLAS must load before any import of mlx.core)
import sys
import types

from . import blas

blas.setup()  # before anything imports mlx.core: MLX binds its BLAS at import

from ._version import __version__
from .adapters import AdapterError, BracesConfig, load_adapter, save_adapter
from .braces import (
    BracedFFN,
    apply_braces,
    braced_layers,
    orthonormalize,
    print_trainable_parameters,
)
from .conversion.gguf import GGUFError
from .data import DataError
from .loading import ModelLoadError, load
from .quantize import QuantizeError
from .steering import SteeringError, add_attributes, steer, steering
from .trainer import TrainingArgs, TrainingError, TrainingInterrupted, train

__all__ = [
    "__version__",
    # the method
    "BracedFFN",
    "BracesConfig",
    "apply_braces",
    "braced_layers",
    "orthonormalize",
    "print_trainable_parameters",
    # adapters on disk, models
    "load",
    "load_adapter",
    "save_adapter",
    # training
    "TrainingArgs",
    "train",
    # steering
    "add_attributes",
    "steer",
    "steering",
    # generation
    "generate",
    "stream_generate",
    # errors (each a ValueError but TrainingInterrupted; each message is one line)
    "AdapterError",
    "DataError",
    "GGUFError",
    "ModelError",
    "ModelLoadError",
    "QuantizeError",
    "SteeringError",
    "TrainingError",
    "TrainingInterrupted",
]


def __getattr__(name: str):
    """``generate``/``stream_generate`` (mlx-lm's generation code) and ``ModelError``
    are imported on first use: imported with the package, ``python -m
    mlx_braces.generate`` / ``mlx_braces.models`` would find their module already
    loaded, which runpy warns about.
    """
    import importlib

    if name in ("generate", "stream_generate"):
        module = importlib.import_module(".generate", __name__)
        return getattr(module, name)  # the import set both (see _Package)
    if name == "ModelError":  # models stays unimported (python -m mlx_braces.models)
        return importlib.import_module(".models", __name__).ModelError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Submodules whose names the package uses for a function: (module, its attributes).
_FUNCTIONS = {
    "generate": ("generate", "stream_generate"),
    "steering": ("steering",),
    "train": ("train",),
}


class _Package(types.ModuleType):
    """Keeps ``mlx_braces.generate``/``train``/``steering`` the functions.

    Importing a submodule of the same name (e.g. the ``mlx_braces.train`` CLI) would
    otherwise rebind the package's attribute to that module (the import system sets
    it on the parent), so ``from mlx_braces import train`` would depend on import
    order. The modules stay in ``sys.modules`` (``importlib.import_module`` returns
    them; ``from mlx_braces.train import main`` works as usual).
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            for attr in _FUNCTIONS[name]:
                super().__setattr__(attr, getattr(value, attr))
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
