"""Braces adapters on disk: ``adapter_config.json`` + ``adapters.safetensors``.

The layout is mlx-lm's. The config says ``fine_tune_type: "braces"`` and carries no
``lora_parameters``, so stock mlx-lm refuses it before touching the model.
Only safetensors and JSON are read and written; files are replaced atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ._version import __version__
from .braces import apply_braces, braced_layers
from .steering import (
    SteeringError,
    attribute_config,
    check_attributes,
    install_attributes,
)

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"


class AdapterError(ValueError):
    """An adapter that does not fit the base model, or cannot be read."""


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Every braces parameter of ``model`` (not the frozen base FFN), by full path."""
    params = {}
    for path, braced in braced_layers(model):
        for k, v in tree_flatten(braced.parameters()):
            if not k.startswith("ffn."):
                params[f"{path}.{k}"] = v
    return params


def braces_config(model: nn.Module) -> dict[str, Any]:
    """The adapter config fields that describe ``model``'s braces."""
    layers = braced_layers(model)
    if not layers:
        raise AdapterError("Model has no braced layers: call apply_braces first.")
    first = layers[0][1]
    return {
        "fine_tune_type": "braces",
        "format_version": FORMAT_VERSION,
        "mlx_braces_version": __version__,
        "num_layers": len(layers),
        "braces_parameters": {
            "rank": first.rank,
            "gate_init": getattr(first, "gate_init", None),
            "layers": [p for p, _ in layers],
            # d_ff per layer: R (rank, d) alone cannot tell bases of equal width apart
            "ffn_dims": [m.hidden_dims for _, m in layers],
        },
        **attribute_config(model),  # "attributes" {name: [words]}, when it has any
    }


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make adapters private
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(model: nn.Module, file: str | Path) -> None:
    """Atomically write ``model``'s braces parameters to a safetensors ``file``."""
    weights = adapter_parameters(model)
    mx.eval(weights)
    _atomic_write(
        Path(file),
        lambda tmp: mx.save_safetensors(
            tmp, weights, metadata={"format": "mlx", "fine_tune_type": "braces"}
        ),
    )


def save_config(config: dict[str, Any], file: str | Path) -> None:
    """Atomically write an adapter config (sorted, indented JSON)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dict(sorted(config.items())), f, indent=4, default=str)

    _atomic_write(Path(file), write)


def save_adapter(model: nn.Module, adapter_path: str | Path, /, **config: Any) -> Path:
    """Save ``model``'s braces to ``adapter_path`` (config + weights); returns the folder.

    Extra keyword arguments (e.g. ``model="mlx-community/..."``, training settings) are
    recorded in the config; the braces fields always describe ``model`` itself.
    """
    adapter_path = Path(adapter_path)
    config.pop("lora_parameters", None)
    save_config({**config, **braces_config(model)}, adapter_path / CONFIG_NAME)
    save_weights(model, adapter_path / WEIGHTS_NAME)
    return adapter_path


def read_config(adapter_path: str | Path) -> dict[str, Any]:
    """Read and check an adapter folder's config; errors name the file and field."""
    file = Path(adapter_path) / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{file}: not found (is {adapter_path} an adapter folder?)")
    try:
        with open(file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return config


def check_braces_config(config: dict[str, Any], file: str | Path) -> None:
    """Fields a braces adapter must have, with their types and format version."""
    version = config.get("format_version")
    if not isinstance(version, int):
        raise AdapterError(f"{file}: field 'format_version' missing or not an integer")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{file}: format_version {version} is newer than this mlx_braces "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade mlx-braces"
        )
    params = config.get("braces_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{file}: field 'braces_parameters' missing")
    rank = params.get("rank")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(
            f"{file}: braces_parameters.rank must be a positive integer, got {rank!r}"
        )
    layers = params.get("layers")
    if not isinstance(layers, list) or not layers:
        raise AdapterError(f"{file}: braces_parameters.layers must be a non-empty list")
    if config.get("attributes") is not None:
        try:
            check_attributes(config["attributes"], f"{file}: field 'attributes'")
        except SteeringError as e:
            raise AdapterError(str(e)) from None
        attr = config.get("attribute_parameters")
        hidden = attr.get("hidden_dims") if isinstance(attr, dict) else None
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
            raise AdapterError(
                f"{file}: attribute_parameters.hidden_dims must be a positive "
                f"integer, got {hidden!r}"
            )


def _read_weights(file: Path) -> dict[str, mx.array]:
    if not file.is_file():
        raise AdapterError(f"{file}: not found")
    try:
        weights = mx.load(str(file), format="safetensors")  # never another format
        mx.eval(weights)
    except (RuntimeError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read ({e})") from None
    return weights


def _brace_like(model: nn.Module, config: dict[str, Any], file: Path) -> None:
    """Brace ``model`` with the layers and rank that ``config`` records."""
    params = config["braces_parameters"]
    want = list(params["layers"])
    num_layers = len(want)
    try:
        apply_braces(
            model,
            rank=params["rank"],
            num_layers=num_layers,
            gate_init=-5.0 if params.get("gate_init") is None else params["gate_init"],
        )
    except ValueError as e:
        raise AdapterError(
            f"{file}: adapter does not fit this base model: {e}"
        ) from None
    have = [p for p, _ in braced_layers(model)]
    if have != want:
        raise AdapterError(
            f"{file}: adapter braces layers {want[0]}..{want[-1]} ({len(want)}) but "
            f"this base model's last {num_layers} FFNs are {have[0]}..{have[-1]}"
        )
    recorded = params.get("ffn_dims")  # absent from adapters saved before it
    actual = [m.hidden_dims for _, m in braced_layers(model)]
    if recorded is not None and recorded != actual:
        i = next((i for i, (a, b) in enumerate(zip(recorded, actual)) if a != b), 0)
        raise AdapterError(
            f"{file}: adapter was trained on a base model whose {want[i]} has FFN "
            f"width {recorded[i]}, this one has {actual[i]} (wrong base model?)"
        )
    if config.get("attributes") is not None:  # conditional branches, filled by weights
        attr = config["attribute_parameters"]
        install_attributes(
            model,
            config["attributes"],
            hidden_dims=attr["hidden_dims"],
            contrast=bool(attr.get("contrast", False)),
        )


def load_adapter(
    model: nn.Module, adapter_path: str | Path, weights: str | None = None
) -> nn.Module:
    """Brace ``model`` as the adapter says and load its weights, checking every tensor.

    ``weights`` picks a file inside the folder (e.g. a numbered checkpoint).
    Raises :class:`AdapterError` naming the file and what differs.
    """
    adapter_path = Path(adapter_path)
    config = read_config(adapter_path)
    config_file = adapter_path / CONFIG_NAME
    if config.get("fine_tune_type") != "braces":
        raise AdapterError(
            f"{config_file}: fine_tune_type is {config.get('fine_tune_type')!r}, "
            "not 'braces'"
        )
    check_braces_config(config, config_file)
    file = adapter_path / (weights or WEIGHTS_NAME)
    loaded = _read_weights(file)
    _brace_like(model, config, config_file)
    expected = adapter_parameters(model)
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    attributes = config.get("attributes")
    if missing and not any(".cond." in k for k in loaded) and attributes is not None:
        raise AdapterError(
            f"{file}: {config_file} lists attributes "
            f"{', '.join(config['attributes'])} but the weights have no attribute "
            f"tensors (e.g. {missing[0]})"
        )
    if missing:
        raise AdapterError(
            f"{file}: missing {len(missing)} tensor(s) the base model needs, "
            f"e.g. {missing[0]}"
        )
    if extra and attributes is None and any(".cond." in k for k in extra):
        raise AdapterError(
            f"{file}: has attribute tensors (e.g. {extra[0]}) but {config_file} "
            "lists no 'attributes'"
        )
    if extra:
        raise AdapterError(
            f"{file}: {len(extra)} tensor(s) the base model has no place for, "
            f"e.g. {extra[0]}"
        )
    for name, w in loaded.items():
        if name.endswith(".cond.e") and w.shape != expected[name].shape:
            raise AdapterError(
                f"{file}: {name} has shape {tuple(w.shape)}, but {config_file} lists "
                f"{len(config['attributes'])} attribute(s) of width "
                f"{expected[name].shape[1]}: expected {tuple(expected[name].shape)}"
            )
        want = expected[name].shape
        if name.endswith(".R") and w.shape != want and w.shape[1:] == want[1:]:
            raise AdapterError(  # R is (rank, d): only the rank differs
                f"{file}: {name} has rank {w.shape[0]} (shape {tuple(w.shape)}) "
                f"but {config_file} records rank {want[0]}"
            )
        if w.shape != want:
            raise AdapterError(
                f"{file}: {name} has shape {tuple(w.shape)}, the base model expects "
                f"{tuple(expected[name].shape)} (wrong base model or rank?)"
            )
        if not mx.all(mx.isfinite(w)).item():
            raise AdapterError(f"{file}: {name} contains NaN or inf")
        if name.endswith(".R"):  # training keeps max |R Rᵀ - I| < 1e-4
            R = w.astype(mx.float32)
            err = mx.abs(R @ R.T - mx.eye(R.shape[0])).max().item()
            if err > 1e-3:
                raise AdapterError(
                    f"{file}: {name} rows are not orthonormal (max |R Rᵀ - I| = "
                    f"{err:.2g}); the file is corrupted or was not saved by mlx_braces"
                )
    model.load_weights(list(loaded.items()), strict=False)
    model.eval()
    return model


def is_braces_adapter(adapter_path: str | Path) -> bool:
    """True if ``adapter_path`` holds a braces adapter config.

    A config with braces fields but another ``fine_tune_type`` is an error, not LoRA.
    """
    config = read_config(adapter_path)
    kind = config.get("fine_tune_type")
    if kind != "braces" and "braces_parameters" in config:
        raise AdapterError(
            f"{Path(adapter_path) / CONFIG_NAME}: has braces_parameters but "
            f"fine_tune_type is {kind!r}; expected 'braces'"
        )
    return kind == "braces"


def load(
    path_or_hf_repo: str | None = None,
    adapter_path: str | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any] | tuple[nn.Module, Any, dict[str, Any]]:
    """``mlx_lm.load`` that also applies braces adapters; same arguments and returns.

    LoRA, DoRA and full adapters are handed to mlx-lm unchanged. With a braces adapter
    and no model, the base model recorded in the adapter config is loaded; a base the
    adapter was trained on after in-memory quantization (``base_quantization``) is
    quantized the same way first.
    """
    from mlx_lm import load as mlx_load

    braces = adapter_path is not None and is_braces_adapter(adapter_path)
    if path_or_hf_repo is None:
        recorded = read_config(adapter_path).get("model") if adapter_path else None
        if not recorded:
            where = (
                f"{Path(adapter_path) / CONFIG_NAME} records none (field 'model')"
                if adapter_path
                else "no adapter"
            )
            raise AdapterError(f"No model given and {where}.")
        path_or_hf_repo = recorded
    model, tokenizer, config = mlx_load(
        path_or_hf_repo,
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=None if braces else adapter_path,
        lazy=lazy,
        return_config=True,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    if braces:
        quant = read_config(adapter_path).get("base_quantization")
        if (
            quant and "quantization" not in config
        ):  # trained on a base quantized in memory
            model, config = quantize_base(model, config, **quant)
        load_adapter(model, adapter_path)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def quantize_base(
    model: nn.Module, config: dict[str, Any], bits: int = 4, group_size: int = 64
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a full-precision base in memory exactly as mlx-lm's convert would."""
    import contextlib
    import io

    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # its bits-per-weight line
        return quantize_model(model, config, group_size=group_size, bits=bits)
