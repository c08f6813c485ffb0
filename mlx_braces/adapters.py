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

from . import commit
from ._version import __version__
from .braces import apply_braces, braced_layers
from .quantize import dequantize_dtype, dequantize_model, quantize_base
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


def write_weights(model: nn.Module):
    """A writer of ``model``'s braces parameters (safetensors) to the path it is given."""
    weights = adapter_parameters(model)
    mx.eval(weights)
    meta = {"format": "mlx", "fine_tune_type": "braces"}
    return lambda tmp: mx.save_safetensors(str(tmp), weights, metadata=meta)


def write_config(config: dict[str, Any]):
    """A writer of an adapter config (sorted, indented JSON) to the path it is given."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dict(sorted(config.items())), f, indent=4, default=str)

    return write


def save_weights(model: nn.Module, file: str | Path) -> None:
    """Atomically write ``model``'s braces parameters to a safetensors ``file``."""
    _atomic_write(Path(file), write_weights(model))


def save_config(config: dict[str, Any], file: str | Path) -> None:
    """Atomically write an adapter config (sorted, indented JSON)."""
    _atomic_write(Path(file), write_config(config))


def save_adapter(model: nn.Module, adapter_path: str | Path, /, **config: Any) -> Path:
    """Save ``model``'s braces to ``adapter_path`` (config + weights); returns the folder.

    Extra keyword arguments (e.g. ``model="mlx-community/..."``, training settings) are
    recorded in the config; the braces fields always describe ``model`` itself.
    """
    adapter_path = _folder_arg(adapter_path)
    config.pop("lora_parameters", None)
    if isinstance(config.get("model"), str) and "base_gguf_sha256" not in config:
        from .models import model_record

        config.update(model_record(config["model"]))  # a GGUF base: its sha256
    files = {  # config and weights replaced together: a kill leaves old or new
        CONFIG_NAME: write_config({**config, **braces_config(model)}),
        WEIGHTS_NAME: write_weights(model),
    }
    commit.commit(adapter_path, files)
    return adapter_path


def _folder_arg(adapter_path: Any) -> Path:
    """``adapter_path`` as a Path; AdapterError for what cannot be a folder path."""
    if not isinstance(adapter_path, (str, os.PathLike)) or not str(adapter_path):
        raise AdapterError(
            f"adapter_path must be a folder path (str or os.PathLike), got "
            f"{adapter_path!r}"
        )
    path = Path(adapter_path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"{path}: is a file, not an adapter folder")
    return path


def _model_arg(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise AdapterError(
            f"model must be an mlx.nn.Module (an mlx-lm model), got "
            f"{type(model).__name__}"
        )


def read_config(adapter_path: str | Path) -> dict[str, Any]:
    """Read and check an adapter folder's config; errors name the file and field."""
    folder = _folder_arg(adapter_path)
    file = folder / CONFIG_NAME
    try:
        current = commit.resolve(folder, CONFIG_NAME)  # through a cut commit's journal
    except commit.CommitError as e:
        raise AdapterError(str(e)) from None
    if not current.is_file():
        raise AdapterError(f"{file}: not found (is {adapter_path} an adapter folder?)")
    try:
        with open(current) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    except OSError as e:
        raise AdapterError(f"{file}: cannot read ({e.strerror})") from None
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
    current = commit.resolve(file.parent, file.name)  # through a cut commit's journal
    if not current.is_file():
        raise AdapterError(f"{file}: not found")
    try:
        weights = mx.load(str(current), format="safetensors")  # never another format
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
    _model_arg(model)
    adapter_path = _folder_arg(adapter_path)
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise AdapterError(
            f"weights must be a file name in {adapter_path}, got {weights!r}"
        )
    config_file = adapter_path / CONFIG_NAME
    file = adapter_path / (weights or WEIGHTS_NAME)
    names = (CONFIG_NAME, file.name)
    for _ in range(5):  # a checkpoint committed while we read: read both again
        seen = commit.snapshot(adapter_path, names)
        config = read_config(adapter_path)
        if config.get("fine_tune_type") != "braces":
            raise AdapterError(
                f"{config_file}: fine_tune_type is {config.get('fine_tune_type')!r}, "
                "not 'braces'"
            )
        check_braces_config(config, config_file)
        loaded = _read_weights(file)
        if commit.snapshot(adapter_path, names) == seen:
            break
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


def check_base_gguf(adapter_path: str | Path, model: str | None) -> None:
    """Refuse a base whose GGUF differs from the one the adapter recorded, if both known."""
    from .models import gguf_sha256

    file = Path(adapter_path) / CONFIG_NAME
    if not file.is_file():
        return
    recorded = read_config(adapter_path).get("base_gguf_sha256")
    actual = gguf_sha256(model) if recorded else None
    if actual is not None and actual != recorded:
        raise AdapterError(
            f"{file}: adapter was trained on the GGUF with sha256 {recorded}, but "
            f"{model} is sha256 {actual} (a different base model file)"
        )


class ModelLoadError(ValueError, OSError):
    """A base model that cannot be found or read (one line; also an OSError)."""


def model_load_message(spec: str, error: BaseException, source: str = "") -> str:
    """One line for an OSError of mlx-lm's load (Hugging Face's are paragraphs)."""
    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        why = "is a file, not a model folder"
    elif local.is_dir():
        why = " ".join(str(error).split()) or type(error).__name__
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:  # not a Hub id
        why = "no such folder"
    elif _hub_offline():
        why = (
            "no such folder, and not in the Hugging Face cache (HF_HUB_OFFLINE is "
            "set, so it cannot be downloaded)"
        )
    else:
        first = " ".join(str(error).split())[:300]
        why = f"no such folder, and the Hugging Face Hub gave: {first}"
    return f"cannot load model {spec}{source}: {why}"


def check_model_available(spec: str) -> None:
    """Raise ModelLoadError now for a model that mlx-lm would fail to load later.

    A path must be a folder; a Hub id is fetched into the Hugging Face cache now (a
    no-op when it is there), so a server fails at startup rather than at its first
    request. (Named models and .gguf files: ``resolve_model``.)
    """
    from .models import is_gguf, named_model

    if named_model(spec) or is_gguf(spec):
        return
    local = Path(spec).expanduser()
    if local.is_dir():
        return
    if local.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ModelLoadError(model_load_message(spec, FileNotFoundError(spec)))
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:  # in the local cache; else download it now, as mlx-lm's load would later
        snapshot_download(spec, allow_patterns=DEFAULT_ALLOW_PATTERNS)
    except (OSError, ValueError) as e:
        raise ModelLoadError(model_load_message(spec, e)) from None


def _hub_offline() -> bool:
    """Whether huggingface_hub runs offline (it reads HF_HUB_OFFLINE on import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def recorded_model(adapter_path: str | Path) -> str | None:
    """The base model an adapter records, usable from any working directory.

    New adapters record a local folder by absolute path; an older adapter's relative
    entry is looked up from here, then inside and beside the adapter folder.
    Hub ids and names come back as recorded.
    """
    model = read_config(adapter_path).get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise AdapterError(
            f"{Path(adapter_path) / CONFIG_NAME}: field 'model' must be a string, got "
            f"{model!r}"
        )
    path = Path(model).expanduser()
    if path.is_absolute() or path.exists():
        return model
    folder = Path(adapter_path).resolve()
    for base in (folder, folder.parent):
        if (base / path).exists():
            return str(base / path)
    return model


def load(
    path_or_hf_repo: str | None = None,
    adapter_path: str | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dequantize: bool | str = False,
) -> tuple[nn.Module, Any] | tuple[nn.Module, Any, dict[str, Any]]:
    """``mlx_lm.load`` that also applies braces adapters; same arguments and returns.

    LoRA, DoRA and full adapters are handed to mlx-lm unchanged. With a braces adapter
    and no model, the base model recorded in the adapter config is loaded; a base the
    adapter was trained on after in-memory quantization (``base_quantization``) is
    quantized the same way first. ``dequantize`` (True, or "float32", "bfloat16",
    "float16") makes the quantized layers full-precision in memory, exactly, before the
    adapter is applied: for hardware whose quantized kernels are slow (Linux CPU).
    """
    from huggingface_hub.errors import HFValidationError
    from mlx_lm import load as mlx_load

    dtype = dequantize_dtype(dequantize)  # a bad value fails before any loading

    from .models import resolve_model

    if path_or_hf_repo is not None and not isinstance(path_or_hf_repo, (str, Path)):
        raise ModelLoadError(
            f"path_or_hf_repo must be a model folder, Hub id or name, got "
            f"{path_or_hf_repo!r}"
        )
    braces = adapter_path is not None and is_braces_adapter(adapter_path)
    source = ""
    if path_or_hf_repo is None:
        recorded = recorded_model(adapter_path) if adapter_path else None
        if adapter_path:
            source = f" (recorded in {Path(adapter_path) / CONFIG_NAME})"
        if not recorded:
            where = (
                f"{Path(adapter_path) / CONFIG_NAME} records none (field 'model')"
                if adapter_path
                else "no adapter"
            )
            raise AdapterError(f"No model given and {where}.")
        path_or_hf_repo = recorded
    if braces:
        check_base_gguf(adapter_path, path_or_hf_repo)
    try:
        model, tokenizer, config = mlx_load(
            resolve_model(path_or_hf_repo),  # a named model or .gguf: its cached folder
            tokenizer_config=tokenizer_config,
            model_config=model_config,
            adapter_path=None if braces else adapter_path,
            lazy=lazy,
            return_config=True,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, HFValidationError) as e:  # no folder; not on (or off) the Hub
        raise ModelLoadError(
            model_load_message(str(path_or_hf_repo), e, source)
        ) from None
    if braces:
        quant = read_config(adapter_path).get("base_quantization")
        if (
            quant and "quantization" not in config
        ):  # trained on a base quantized in memory
            model, config = quantize_base(model, config, **quant)
    if dtype is not None:
        dequantize_model(model, dtype)
    if braces:
        load_adapter(model, adapter_path)
    return (model, tokenizer, config) if return_config else (model, tokenizer)
