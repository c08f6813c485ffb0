"""Convert GGUF files (llama.cpp's format) into mlx-lm model folders.

``convert_gguf(FILE.gguf, DIR)`` writes a folder that plain ``mlx_lm.load``
opens: ``config.json`` built from the GGUF metadata, ``model.safetensors``
under mlx-lm's parameter names, the tokenizer files of
:func:`mlx_braces.conversion.gguf_tokenizer.tokenizer_files` and a ``README.md``
card with the source file's sha256 and licence.

Architectures: ``llama`` (SmolLM, TinyLlama, Llama 2/3, dense Mistral),
``qwen2`` (Qwen2/2.5) and ``gemma3`` (Gemma 3 text, mlx-lm ``gemma3_text``).
The conversion undoes what llama.cpp's ``convert_hf_to_gguf.py`` changed:

* ``llama``: q/k rows were permuted (``LlamaModel.permute``) for llama.cpp's
  interleaved rope; the inverse permutation restores Hugging Face's layout,
  which mlx-lm rotates as halves (``rope_traditional`` false).
* ``gemma3``: every ``*norm.weight`` was stored plus 1; mlx-lm's Gemma RMSNorm
  multiplies by ``1 + w``, so 1 is subtracted again. Hyperparameters llama.cpp
  hard-codes (sliding-window pattern 6, local rope base 10000, the query scale)
  are written into ``config.json``.

Tensor types: Q4_0, Q4_1 and Q8_0 blocks map exactly onto MLX affine
quantization with group size 32 (Q4_0: scale d, bias -8d; Q4_1: d, m; Q8_0:
d, bias -128d over ``q + 128``) and stay quantized, bit for bit what
``mx.load`` makes of them. F32/F16/BF16 tensors keep their values. Every other
type the ``gguf`` package can dequantize (K-quants, Q5_0, IQ*, ...) becomes a
float tensor, optionally re-quantized with ``mx.quantize``.

Command line: ``python -m mlx_braces.convert --gguf FILE --mlx-path DIR``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
# Bumped whenever the converter's output changes for the same input, so that cached
# conversions made by an older converter are rebuilt (mlx_braces.models checks it).
CONVERTER_VERSION = 2
DTYPES = ("float16", "bfloat16", "float32")
GROUP = 32  # block size of Q4_0 / Q4_1 / Q8_0
# Dequantized (non Q4_0/Q4_1/Q8_0) tensors are stored in this dtype unless
# ``dtype`` says otherwise. Gemma 3's residual stream leaves the float16 range
# (docs/METHOD.md, "GGUF import"), so it gets float32.
DEFAULT_DTYPE = {"llama": "float16", "qwen2": "float16", "gemma3": "float32"}

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# GGUF tensor names -> mlx-lm names (gguf-py constants.py / tensor_mapping.py).
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ARCH_LAYER_NAMES = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",  # FFN_PRE_NORM, alias of ffn_norm
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
# Modules mlx-lm builds as nn.Linear / nn.Embedding (quantizable).
MATRIX_SUFFIXES = (
    "embed_tokens",
    "lm_head",
    "_proj",
)


class GGUFError(ValueError):
    """Bad or unsupported GGUF input (one line naming the file, tensor or field)."""


def _reader(path: Path):
    """A ``gguf.GGUFReader`` for ``path`` whose tensors all lie inside the file."""
    import gguf

    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, OSError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFError(f"{path}: unreadable or truncated GGUF file ({msg})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(
                f"{path}: truncated; tensor {t.name} needs bytes up to "
                f"{t.data_offset + t.n_bytes}, the file has {size}"
            )
    return reader


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _metadata(reader, path: Path) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = _plain(field.contents())
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFError(
                f"{path}: metadata field {key} is unreadable ({e})"
            ) from None
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python (strings decoded, arrays as lists)."""
    path = Path(path)
    return _metadata(_reader(path), path)


# ---------------------------------------------------------------------------
# Metadata -> config.json


def _field(meta: dict, key: str, kind: type, path: Path, default: Any = ...) -> Any:
    """meta[key] checked to be a ``kind`` (int accepted for float)."""
    if key not in meta:
        if default is ...:
            raise GGUFError(f"{path}: metadata field {key} is missing")
        return default
    value = meta[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise GGUFError(
            f"{path}: metadata field {key} = {value!r}, expected {kind.__name__}"
        )
    return value


def _positive(meta: dict, key: str, path: Path, default: Any = ...) -> int:
    value = _field(meta, key, int, path, default)
    if value is not None and value <= 0:
        raise GGUFError(f"{path}: metadata field {key} = {value}, expected > 0")
    return value


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    """mlx-lm ``rope_scaling`` from ``{arch}.rope.scaling.*`` (none or linear)."""
    kind = _field(meta, f"{arch}.rope.scaling.type", str, path, None)
    factor = _field(meta, f"{arch}.rope.scaling.factor", float, path, None)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise GGUFError(
        f"{path}: metadata field {arch}.rope.scaling.type = {kind!r} is not "
        "supported (supported: none, linear)"
    )


def _llama3_rope_scaling(factors: np.ndarray, base: float, dim: int) -> dict | None:
    """The Llama 3.1 rope parameters that produce ``rope_freqs`` factors, if any.

    convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) stores only the
    per-frequency factors; these are the parameters Meta's models use.
    """
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    for factor in (8.0, 16.0, 32.0, 64.0):
        for low, high, old in ((1.0, 4.0, 8192),):
            smooth = (old / wavelen - low) / (high - low)
            want = np.where(
                wavelen < old / high,
                1.0,
                np.where(
                    wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)
                ),
            )
            if factors.shape == want.shape and np.allclose(factors, want, rtol=1e-5):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": old,
                }
    return None


def build_config(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path
) -> dict[str, Any]:
    """mlx-lm ``config.json`` (without quantization) from GGUF metadata.

    ``shapes`` maps GGUF tensor names to numpy (rows, cols) shapes; the
    vocabulary size and tied embeddings are read off the tensors.
    """
    arch = _field(meta, "general.architecture", str, path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _positive(meta, f"{arch}.embedding_length", path)
    n_heads = _positive(meta, f"{arch}.attention.head_count", path)
    n_kv = _positive(meta, f"{arch}.attention.head_count_kv", path, n_heads)
    head_dim = _positive(meta, f"{arch}.attention.key_length", path, hidden // n_heads)
    value_dim = _positive(meta, f"{arch}.attention.value_length", path, head_dim)
    if value_dim != head_dim or n_heads % n_kv:
        raise GGUFError(
            f"{path}: attention.key_length {head_dim}, value_length {value_dim}, "
            f"head_count {n_heads}, head_count_kv {n_kv}: expected equal key/value "
            "lengths and head_count a multiple of head_count_kv"
        )
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    vocab, embd_cols = shapes["token_embd.weight"]
    if embd_cols != hidden:
        raise GGUFError(
            f"{path}: token_embd.weight has {embd_cols} columns, "
            f"{arch}.embedding_length is {hidden}"
        )
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": MODEL_TYPES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": _positive(meta, f"{arch}.block_count", path),
        "intermediate_size": _positive(meta, f"{arch}.feed_forward_length", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _field(
            meta, f"{arch}.attention.layer_norm_rms_epsilon", float, path
        ),
        "vocab_size": vocab,
        "max_position_embeddings": _positive(meta, f"{arch}.context_length", path),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    rope_dims = _positive(meta, f"{arch}.rope.dimension_count", path, head_dim)
    if rope_dims != head_dim:
        raise GGUFError(
            f"{path}: {arch}.rope.dimension_count = {rope_dims}; only rope over the "
            f"whole head ({head_dim}) is supported"
        )
    rope_scaling = _rope_scaling(meta, arch, path)
    if arch in ("llama", "qwen2"):
        config["rope_theta"] = _field(
            meta, f"{arch}.rope.freq_base", float, path, 10000.0
        )
        config["rope_traditional"] = False
        config["hidden_act"] = "silu"
        if arch == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in shapes
            config["mlp_bias"] = False
        elif head_dim * n_heads != hidden:
            raise GGUFError(
                f"{path}: qwen2 with key_length {head_dim} != embedding_length / "
                f"head_count ({hidden // n_heads}) is not supported by mlx-lm"
            )
    else:  # gemma3, hyperparameters from llama.cpp's llama-model.cpp LLM_ARCH_GEMMA3
        softcap = _field(meta, "gemma3.final_logit_softcapping", float, path, 0.0)
        if softcap:
            raise GGUFError(
                f"{path}: gemma3.final_logit_softcapping = {softcap}; mlx-lm's "
                "gemma3_text has no final soft-capping"
            )
        window = _field(meta, "gemma3.attention.sliding_window", int, path, 0)
        n_layers = config["num_hidden_layers"]
        config.update(
            rope_theta=_field(meta, "gemma3.rope.freq_base", float, path, 1e6),
            rope_local_base_freq=10000.0,
            # 1/sqrt(n_embd/n_head) for the 27B (62 layers), else 1/sqrt(head_dim)
            query_pre_attn_scalar=hidden // n_heads if n_layers == 62 else head_dim,
            sliding_window=window if window > 0 else config["max_position_embeddings"],
            sliding_window_pattern=6 if window > 0 else 1,
            hidden_activation="gelu_pytorch_tanh",
        )
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


# ---------------------------------------------------------------------------
# Tensors


def mlx_name(gguf_name: str, arch: str) -> str | None:
    """The mlx-lm parameter name of a GGUF tensor name, or None if unknown."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        names = {**LAYER_NAMES, **ARCH_LAYER_NAMES[arch]}
        if parts[2] in names:
            return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
    return None


def _rope_unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes convert_hf_to_gguf.py's ``LlamaModel.permute``.

    permute maps HF row (h, s, i) (head h, half s, index i) to GGUF row
    (h, i, s); ``hf_rows = gguf_rows[index]``.
    """
    return (
        np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).ravel()
    )


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) uint8 values < 2**bits -> MLX's packed uint32 (rows, cols*bits/32)."""
    if bits == 8:
        packed = q
    else:  # 4 bits: element 2j in the low nibble of byte j, 2j+1 in the high one
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return np.ascontiguousarray(packed).view("<u4")


def native_quantized(
    blocks: np.ndarray, kind: str, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Q4_0 / Q4_1 / Q8_0 blocks as MLX affine (weight, scales, biases, bits).

    ``blocks`` is the GGUF tensor's raw uint8 data (rows, bytes per row). The
    result dequantizes, as ``scales * q + biases``, to exactly ggml's values.
    """
    n_blocks = cols // GROUP
    b = np.ascontiguousarray(blocks).reshape(rows, n_blocks, -1)
    d = b[..., 0:2].copy().view("<f2")[..., 0]  # (rows, n_blocks)
    if kind == "Q8_0":
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = (d.astype(np.float32) * -128).astype(np.float16)
        bits = 8
    else:
        if kind == "Q4_0":
            qs, bias = b[..., 2:], (d.astype(np.float32) * -8).astype(np.float16)
        else:  # Q4_1
            qs, bias = b[..., 4:], b[..., 2:4].copy().view("<f2")[..., 0]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # elements 0-15, 16-31
        bits = 4
    return _pack(q.reshape(rows, cols), bits), d, bias, bits


NATIVE = ("Q4_0", "Q4_1", "Q8_0")
FLOATS = ("F32", "F16", "BF16")


def _read_tensor(t, path: Path) -> tuple[str, Any]:
    """("float", float32/float16/bfloat16-bits array) | ("native", quant) | ("dequantized", f32)."""
    import gguf

    kind = t.tensor_type.name
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # numpy order
    if kind in ("F32", "F16"):
        return "float", np.asarray(t.data).reshape(shape)
    if kind == "BF16":
        return "bf16", np.asarray(t.data).view(np.uint16).reshape(shape)
    if kind in NATIVE and len(shape) == 2 and shape[1] % GROUP == 0:
        return "native", native_quantized(t.data, kind, *shape)
    try:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise GGUFError(
            f"{path}: tensor {t.name} has type {kind}, which cannot be read ({e})"
        ) from None
    return "dequantized", np.asarray(values, dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------------------
# Folder writing


def _model_card(path: Path, meta: dict, config: dict, notes: list[str]) -> str:
    from ..models import sha256_file  # not at import: models imports this module

    name = meta.get("general.name") or path.stem
    licence = meta.get("general.license") or "not stated in the GGUF metadata"
    lines = [
        f"# {name}, converted from GGUF for mlx-lm",
        "",
        "Converted with `mlx_braces/conversion/gguf.py` "
        f"(`python -m mlx_braces.convert --gguf {path.name} ...`).",
        "",
        "## Source and licence",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        f"| `{path.name}` | `{sha256_file(path)}` |",
        "",
        f"* Licence (GGUF `general.license`): {licence}. The converted weights "
        "carry the licence of the original model.",
    ]
    for key, label in (
        ("general.organization", "Organization"),
        ("general.license.link", "Licence link"),
        ("general.source.url", "Source"),
        ("general.base_model.0.repo_url", "Base model"),
    ):
        if isinstance(meta.get(key), str):
            lines.append(f"* {label}: {meta[key]}")
    lines += [
        "",
        "## What the conversion did",
        "",
        f"GGUF architecture `{meta['general.architecture']}` became mlx-lm "
        f"`{config['model_type']}`: {config['num_hidden_layers']} layers, hidden "
        f"size {config['hidden_size']}, vocabulary {config['vocab_size']}.",
        "",
        *[f"* {n}" for n in notes],
        "",
    ]
    return "\n".join(lines)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]
    if name not in DTYPES:
        raise GGUFError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def convert_gguf(
    gguf_path: str | os.PathLike,
    mlx_path: str | os.PathLike,
    *,
    dtype: Any = None,
    q_bits: int | None = None,
    q_group_size: int = 64,
    progress: bool = True,
) -> Path:
    """Convert a GGUF file into an mlx-lm model folder at ``mlx_path``.

    Args:
        gguf_path: A ``llama``, ``qwen2`` or ``gemma3`` GGUF file.
        mlx_path: The folder to create; it must not exist yet.
        dtype: float16 / bfloat16 / float32 for float tensors. ``None`` keeps
            F32/F16/BF16 tensors as they are and stores dequantized ones in
            ``DEFAULT_DTYPE[arch]``. Q4_0/Q4_1/Q8_0 scales and biases stay
            float16 (exact), or float32 when that is the dequantized dtype.
        q_bits: Re-quantize the weight matrices that are not Q4_0/Q4_1/Q8_0
            with ``mx.quantize`` at this many bits (2, 3, 4, 5, 6 or 8).
        q_group_size: Group size for ``q_bits`` (32, 64 or 128).
        progress: Show a tqdm bar over the tensors.

    Returns:
        ``mlx_path`` as a Path. The folder is built beside it and renamed into
        place, so a failure leaves nothing at ``mlx_path``.

    Raises:
        GGUFError: bad or unsupported input (one line).
    """
    gguf_path, mlx_path = Path(gguf_path), Path(mlx_path)
    dtype = _dtype_name(dtype)
    if q_bits is not None and q_bits not in (2, 3, 4, 5, 6, 8):
        raise GGUFError(f"q_bits must be 2, 3, 4, 5, 6 or 8, got {q_bits!r}")
    if q_bits is not None and q_group_size not in (32, 64, 128):
        raise GGUFError(f"q_group_size must be 32, 64 or 128, got {q_group_size!r}")
    if mlx_path.exists():
        raise GGUFError(f"{mlx_path}: already exists; choose a new folder")
    reader = _reader(gguf_path)
    meta = _metadata(reader, gguf_path)
    shapes = {
        t.name: tuple(int(n) for n in reversed(t.shape.tolist()))
        for t in reader.tensors
    }
    config = build_config(meta, shapes, gguf_path)
    arch = meta["general.architecture"]

    from .gguf_tokenizer import tokenizer_files

    try:
        tok_files = tokenizer_files(meta)
    except ValueError as e:
        raise GGUFError(f"{gguf_path}: {e}") from None
    try:
        from .gguf_tokenizer import eog_token_ids

        config["eos_token_id"] = eog_token_ids(meta)
    except (ImportError, ValueError):
        pass

    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    build = Path(
        tempfile.mkdtemp(
            prefix=f".{mlx_path.name}-", suffix=".tmp", dir=mlx_path.parent
        )
    )
    try:
        notes = _write_weights(
            reader,
            gguf_path,
            build,
            config,
            arch,
            dtype,
            q_bits,
            q_group_size,
            progress,
        )
        for name, obj in tok_files.items():
            _write_json(build / name, obj)
        _write_json(build / "config.json", config)
        (build / "README.md").write_text(
            _model_card(gguf_path, meta, config, notes), encoding="utf-8"
        )
        os.rename(build, mlx_path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return mlx_path


def _write_weights(
    reader,
    path: Path,
    out: Path,
    config: dict,
    arch: str,
    dtype: str | None,
    q_bits: int | None,
    q_group_size: int,
    progress: bool,
) -> list[str]:
    """Convert every tensor into ``out/model.safetensors``; fills config's quantization."""
    import mlx.core as mx
    from tqdm import tqdm

    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    deq_dtype = getattr(mx, dtype or DEFAULT_DTYPE[arch])
    # float16 scales are exact; a float32 target widens them (still exact), so that
    # e.g. a Q8_0 embedding does not start a float16 residual stream.
    scale_dtype = mx.float32 if deq_dtype == mx.float32 else mx.float16
    arrays: dict[str, mx.array] = {}
    quant: dict[str, dict] = {}
    types: dict[str, int] = {}
    max_err, n_requant, n_native = 0.0, 0, 0
    for t in tqdm(reader.tensors, desc="Converting", disable=not progress):
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        if t.name == "rope_freqs.weight":
            factors = np.asarray(t.data, dtype=np.float64).ravel()
            scaling = _llama3_rope_scaling(
                factors, config["rope_theta"], config["head_dim"]
            )
            if scaling is None:
                raise GGUFError(
                    f"{path}: tensor rope_freqs.weight does not match Llama 3 rope "
                    "scaling (factor 8/16/32/64, low 1, high 4, original 8192)"
                )
            config["rope_scaling"] = scaling
            continue
        name = mlx_name(t.name, arch)
        if name is None:
            raise GGUFError(
                f"{path}: tensor {t.name} has no mlx-lm {config['model_type']} "
                "counterpart"
            )
        how, data = _read_tensor(t, path)
        index = None
        if arch == "llama" and t.name.rsplit(".", 2)[-2] in ("attn_q", "attn_k"):
            heads = n_heads if ".attn_q." in t.name else n_kv
            rows = data[0].shape[0] if how == "native" else data.shape[0]
            index = _rope_unpermute_index(rows, heads)
        if how == "native":
            wq, scales, biases, bits = data
            if index is not None:
                wq, scales, biases = wq[index], scales[index], biases[index]
            module = name.rsplit(".", 1)[0]
            arrays[f"{module}.weight"] = mx.array(wq)
            arrays[f"{module}.scales"] = mx.array(scales).astype(scale_dtype)
            arrays[f"{module}.biases"] = mx.array(biases).astype(scale_dtype)
            quant[module] = {"group_size": GROUP, "bits": bits}
            n_native += 1
            continue
        if index is not None:
            data = data[index]
        if how == "bf16":
            w = mx.array(data).view(mx.bfloat16)
        else:
            w = mx.array(data)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w.astype(mx.float32) - 1.0  # undo convert_hf_to_gguf's norm_shift
        if how == "dequantized":
            w = w.astype(deq_dtype)
        elif dtype is not None:
            w = w.astype(getattr(mx, dtype))
        module = name.rsplit(".", 1)[0]
        is_matrix = name.endswith(".weight") and module.endswith(MATRIX_SUFFIXES)
        if (
            q_bits is not None
            and is_matrix
            and w.ndim == 2
            and w.shape[1] % q_group_size == 0
        ):
            wq, scales, biases = mx.quantize(w, group_size=q_group_size, bits=q_bits)
            back = mx.dequantize(
                wq, scales, biases, group_size=q_group_size, bits=q_bits
            )
            err = mx.max(mx.abs(back.astype(mx.float32) - w.astype(mx.float32))).item()
            max_err, n_requant = max(max_err, err), n_requant + 1
            arrays[f"{module}.weight"] = wq
            arrays[f"{module}.scales"] = scales
            arrays[f"{module}.biases"] = biases
            quant[module] = {"group_size": q_group_size, "bits": q_bits}
        else:
            arrays[name] = w
        mx.eval(list(arrays.values())[-3:])
    notes = [
        "GGUF tensor types: "
        + ", ".join(f"{n} {k}" for k, n in sorted(types.items()))
        + "."
    ]
    if quant:
        # nn.quantize needs a default; every quantized module is listed explicitly.
        first = next(iter(quant.values()))
        config["quantization"] = {**first, **quant}
        config["quantization_config"] = config["quantization"]
        notes.append(
            f"{n_native} Q4_0/Q4_1/Q8_0 matrices stay quantized as MLX affine, "
            "group size 32, with the same values."
        )
    if n_requant:
        msg = (
            f"Re-quantized {n_requant} matrices to {q_bits} bits, group size "
            f"{q_group_size}: largest absolute error {max_err:.3g}."
        )
        notes.append(msg)
        print(msg, file=sys.stderr)
    if arch == "llama":
        notes.append("q/k rows un-permuted to Hugging Face's rope layout.")
    if arch == "gemma3":
        notes.append("1 subtracted from every norm weight (llama.cpp stores 1 + w).")
    notes.append(
        f"Dequantized tensors stored as {dtype or DEFAULT_DTYPE[arch]}, quantized "
        f"scales as {str(scale_dtype).split('.')[-1]}; "
        f"F32/F16/BF16 tensors {'as ' + dtype if dtype else 'unchanged'}."
    )
    mx.save_safetensors(
        str(out / "model.safetensors"), arrays, metadata={"format": "mlx"}
    )
    return notes
