"""Loading a base model with its adapter: ``mlx_lm.load`` that also applies braces.

Named models and ``.gguf`` files resolve to cached mlx-lm folders
(:mod:`mlx_braces.models`); a braces adapter is read and checked by
:mod:`mlx_braces.adapters`; LoRA, DoRA and full adapters go to mlx-lm unchanged.
A model that cannot be found or read is one line, :class:`ModelLoadError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.nn as nn

from .adapters import (
    CONFIG_NAME,
    AdapterError,
    check_base_gguf,
    is_braces_adapter,
    load_adapter,
    read_config,
    recorded_model,
)
from .quantize import dequantize_dtype, dequantize_model, quantize_base


class ModelLoadError(ValueError, OSError):
    """A base model that cannot be found or read (one line; also an OSError)."""


def model_load_message(spec: str, error: BaseException, source: str = "") -> str:
    """One line for an OSError of mlx-lm's load (Hugging Face's are paragraphs)."""
    from .models import is_local_path  # (models is not imported with the package)

    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        why = "is a file, not a model folder"
    elif local.is_dir():
        why = " ".join(str(error).split()) or type(error).__name__
    elif is_local_path(spec):  # not a Hub id
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
    from .models import is_gguf, is_local_path, named_model

    if named_model(spec) or is_gguf(spec):
        return
    local = Path(spec).expanduser()
    if local.is_dir():
        return
    if local.exists() or is_local_path(spec):
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

    from .models import resolve_model

    dtype = dequantize_dtype(dequantize)  # a bad value fails before any loading
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
        if quant and "quantization" not in config:  # trained on a base quantized
            model, config = quantize_base(model, config, **quant)  # in memory
    if dtype is not None:
        dequantize_model(model, dtype)
    if braces:
        load_adapter(model, adapter_path)
    return (model, tokenizer, config) if return_config else (model, tokenizer)
