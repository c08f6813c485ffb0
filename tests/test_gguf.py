"""GGUF -> mlx-lm conversion (mlx_braces.conversion.gguf) against a float64 llama.cpp-style forward.

Tiny GGUFs are written with the ``gguf`` package the way llama.cpp's
convert_hf_to_gguf.py writes them (llama q/k rows permuted, Gemma norms + 1),
in every supported tensor type. The reference forward below reads the GGUF
tensors as they are stored and computes with llama.cpp's conventions
(interleaved rope for llama, neox rope for qwen2/gemma3, Gemma norm weights
used as stored), so a converter that forgets to undo a convention fails.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mlx_braces.conversion.gguf import GGUFError, convert_gguf, read_metadata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_copy import copy_gguf  # noqa: E402

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 256, 256, 64, 4, 2, 64
IDS = [1, 5, 9, 33, 7, 60, 2, 14]
# Matrix types cycled over each model's 2-D tensors; every arch sees all of them.
ALL_TYPES = (T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.BF16, T.F32)
NATIVE_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.F32)  # what mx.load also reads


# ---------------------------------------------------------------------------
# Writing GGUFs


def _kquant_blocks(qtype: T, rows: int, cols: int, rng) -> np.ndarray:
    """Valid random blocks for a type gguf cannot quantize into (finite f16 scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(1e-5, 3e-5, size=(rows, cols // block)).astype("<f2")
    at = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q2_K: (size - 4, size - 2)}.get(
        qtype, (size - 2,)
    )  # Q6_K/Q3_K keep d last; Q4_K/Q5_K start with d, dmin
    for offset in at:
        raw[..., offset : offset + 2] = scale.view(np.uint8).reshape(*scale.shape, 2)
    return raw.reshape(rows, -1)


def _stored(w: np.ndarray, qtype: T, rng) -> np.ndarray:
    """w (float32, rows x cols) in GGUF storage for ``qtype`` (raw bytes if quantized)."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in (T.Q4_K, T.Q6_K):
        return _kquant_blocks(qtype, *w.shape, rng)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def _spm_vocab(writer: gguf.GGUFWriter) -> None:
    """A 64-token SentencePiece ('llama') vocabulary: specials, letters, pieces."""
    pieces = ["<unk>", "<s>", "</s>", "\u2581"] + [chr(c) for c in range(97, 123)]
    pieces += ["\u2581" + chr(c) for c in range(97, 123)]
    pieces += [f"<extra_{i}>" for i in range(VOCAB - len(pieces))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(VOCAB - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _heads(arch: str) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim); gemma3's head dim is not hidden / heads,
    as in the real models, so a wrong query_pre_attn_scalar shows."""
    return (4, 1, 128) if arch == "gemma3" else (HEADS, KV_HEADS, HEAD_DIM)


def hf_weights(arch: str, n_layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under GGUF names, in Hugging Face layout and norm convention."""
    rng = np.random.default_rng(seed)
    heads, kv, head_dim = _heads(arch)
    w = {"token_embd.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN))}
    w["output_norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
    if arch == "llama":
        w["output.weight"] = rng.normal(0, 0.06, (VOCAB, HIDDEN))
    for i in range(n_layers):
        p = f"blk.{i}."
        w[p + "attn_q.weight"] = rng.normal(0, 0.06, (heads * head_dim, HIDDEN))
        w[p + "attn_k.weight"] = rng.normal(0, 0.06, (kv * head_dim, HIDDEN))
        w[p + "attn_v.weight"] = rng.normal(0, 0.06, (kv * head_dim, HIDDEN))
        w[p + "attn_output.weight"] = rng.normal(0, 0.06, (HIDDEN, heads * head_dim))
        w[p + "ffn_gate.weight"] = rng.normal(0, 0.06, (FFN, HIDDEN))
        w[p + "ffn_up.weight"] = rng.normal(0, 0.06, (FFN, HIDDEN))
        w[p + "ffn_down.weight"] = rng.normal(0, 0.06, (HIDDEN, FFN))
        w[p + "attn_norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
        w[p + "ffn_norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
        if arch == "qwen2":
            for m, n in (("q", heads), ("k", kv), ("v", kv)):
                w[p + f"attn_{m}.bias"] = rng.normal(0, 0.3, n * head_dim)
        if arch == "gemma3":  # HF Gemma norm weights w (the model uses 1 + w)
            for n in ("attn_norm", "ffn_norm"):
                w[p + f"{n}.weight"] -= 1.0
            w[p + "post_attention_norm.weight"] = rng.uniform(-0.5, 0.5, HIDDEN)
            w[p + "post_ffw_norm.weight"] = rng.uniform(-0.5, 0.5, HIDDEN)
            w[p + "attn_q_norm.weight"] = rng.uniform(-0.5, 0.5, head_dim)
            w[p + "attn_k_norm.weight"] = rng.uniform(-0.5, 0.5, head_dim)
    if arch == "gemma3":
        w["output_norm.weight"] -= 1.0
    return {k: v.astype(np.float32) for k, v in w.items()}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rows -> llama.cpp rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path,
    arch: str,
    types: tuple[T, ...] = ALL_TYPES,
    n_layers: int | None = None,
    seed: int = 0,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """A tiny GGUF as convert_hf_to_gguf.py would write it; matrices cycle ``types``.

    gemma3 defaults to 6 layers: mlx-lm's gemma3_text needs one full
    sliding-window pattern, and layer 5 is the global (full rope base) one.
    """
    n_layers = n_layers or (6 if arch == "gemma3" else 2)
    rng = np.random.default_rng(seed + 1)
    heads, kv, head_dim = _heads(arch)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_license("mit")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    writer.add_rope_freq_base({"llama": 5e4, "qwen2": 1e6, "gemma3": 1e6}[arch])
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(512)
    else:
        writer.add_rope_dimension_count(head_dim)
    _spm_vocab(writer)
    if (
        rope_freqs is not None
    ):  # Llama 3.1 rope scaling, as convert_hf_to_gguf stores it
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    matrices = 0
    for name, w in hf_weights(arch, n_layers, seed).items():
        if arch == "llama" and ".attn_q." in name:
            w = _permute(w, heads)
        if arch == "llama" and ".attn_k." in name:
            w = _permute(w, kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0  # Gemma3Model.norm_shift
        if w.ndim == 1:
            writer.add_tensor(name, w)
            continue
        qtype = types[matrices % len(types)]
        matrices += 1
        data = _stored(w, qtype, rng)
        writer.add_tensor(
            name, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------
# llama.cpp-convention reference forward (float64)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` dequantized by the gguf package, float64, numpy order."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    return {k: v.astype(np.float64) for k, v in out.items()}


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, base: float, neox: bool, factors=None) -> np.ndarray:
    """ggml_rope: x (heads, seq, dim); NORM mode rotates (2i, 2i+1), NEOX (i, i+d/2).

    ``factors`` (dim/2,): ggml_rope_ext's freq_factors (rope_freqs), theta / factor.
    """
    _, seq, dim = x.shape
    theta = base ** (-np.arange(0, dim, 2) / dim)  # (dim/2,)
    if factors is not None:
        theta = theta / factors
    ang = np.arange(seq)[:, None] * theta[None, :]  # (seq, dim/2)
    cos, sin = np.cos(ang), np.sin(ang)
    if neox:
        a, b = x[..., : dim // 2], x[..., dim // 2 :]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if neox:
        return np.concatenate([ra, rb], axis=-1)
    return np.stack([ra, rb], axis=-1).reshape(x.shape)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(
    path: Path,
    ids: list[int],
    neox: bool | None = None,
    norm_shift: float = 0.0,
    freq_factors: bool = True,
) -> np.ndarray:
    """Logits (seq, vocab) of the GGUF at ``path``, computed as llama.cpp does.

    ``neox``, ``norm_shift`` and ``freq_factors`` only exist to check that a wrong
    convention changes the result (the defaults are llama.cpp's).
    """
    meta = read_metadata(path)
    arch = meta["general.architecture"]
    w = gguf_tensors(path)
    n_layers = meta[f"{arch}.block_count"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    n_head, n_kv = (
        meta[f"{arch}.attention.head_count"],
        meta[f"{arch}.attention.head_count_kv"],
    )
    gemma = arch == "gemma3"
    neox = (arch != "llama") if neox is None else neox

    def norm(x, name):
        return _rms(x, w[name] + norm_shift, eps)

    x = w["token_embd.weight"][ids]  # (seq, hidden)
    if gemma:
        x = x * math.sqrt(HIDDEN)
    seq = len(ids)
    causal = np.triu(np.full((seq, seq), -np.inf), 1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm.weight")
        q, k, v = (h @ w[p + f"attn_{m}.weight"].T for m in "qkv")
        if arch == "qwen2":
            q, k, v = (t + w[p + f"attn_{m}.bias"] for t, m in zip((q, k, v), "qkv"))
        q = q.reshape(seq, n_head, -1).transpose(1, 0, 2)  # (heads, seq, dim)
        k = k.reshape(seq, n_kv, -1).transpose(1, 0, 2)
        v = v.reshape(seq, n_kv, -1).transpose(1, 0, 2)
        base = meta[f"{arch}.rope.freq_base"]
        if gemma:
            q, k = norm(q, p + "attn_q_norm.weight"), norm(k, p + "attn_k_norm.weight")
            base = base if i % 6 == 5 else 10000.0  # llama.cpp: swa pattern 6
        ff = w.get("rope_freqs.weight") if freq_factors else None
        q, k = _rope(q, base, neox, ff), _rope(k, base, neox, ff)
        k, v = np.repeat(k, n_head // n_kv, 0), np.repeat(v, n_head // n_kv, 0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]) + causal
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(seq, -1) @ w[
            p + "attn_output.weight"
        ].T
        x = x + (norm(o, p + "post_attention_norm.weight") if gemma else o)
        h = norm(x, p + "ffn_norm.weight")
        g = h @ w[p + "ffn_gate.weight"].T
        act = _gelu_tanh(g) if gemma else g / (1 + np.exp(-g))
        m = (act * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = x + (norm(m, p + "post_ffw_norm.weight") if gemma else m)
    x = norm(x, "output_norm.weight")
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def mlx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    "arch,n_layers", [("llama", 2), ("qwen2", 2), ("gemma3", 6)]
)  # gemma3: layer 5 is the global-attention (full rope base) layer
def test_logits_match_llama_cpp_reference(tmp_path, arch, n_layers):
    gguf_path = write_gguf(tmp_path / f"{arch}.gguf", arch, n_layers=n_layers)
    folder = convert_gguf(gguf_path, tmp_path / "mlx", dtype="float32", progress=False)
    ref = reference_logits(gguf_path, IDS)
    assert _rel_err(mlx_logits(folder, IDS), ref) < 2e-4
    # The test can fail: llama.cpp's other rope mode or a forgotten Gemma norm
    # offset moves the logits far beyond the tolerance.
    wrong = {"neox": arch == "llama"}
    if arch == "gemma3":
        wrong = {"norm_shift": 1.0}
    assert _rel_err(reference_logits(gguf_path, IDS, **wrong), ref) > 1e-2


def test_llama3_rope_freqs(tmp_path):
    dim, base, factor, old = HEAD_DIM, 5e4, 8.0, 8192  # Llama 3.1's low 1, high 4
    wavelen = 2 * math.pi * base ** (np.arange(0, dim, 2) / dim)
    smooth = (old / wavelen - 1) / (4 - 1)
    ff = np.where(
        wavelen < old / 4,
        1.0,
        np.where(wavelen > old, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    assert (ff == 1).any() and (ff == factor).any() and ((ff > 1) & (ff < factor)).any()
    path = write_gguf(tmp_path / "l.gguf", "llama", types=(T.F32,), rope_freqs=ff)
    folder = convert_gguf(path, tmp_path / "mlx", progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    ids = [i % VOCAB for i in range(0, 7 * 96, 7)]  # 96 positions: factors matter
    ref = reference_logits(path, ids)
    assert _rel_err(mlx_logits(folder, ids), ref) < 2e-4
    assert _rel_err(reference_logits(path, ids, freq_factors=False), ref) > 2e-3
    _rewrite(path, tmp_path / "odd.gguf", replace=("rope_freqs.weight", ff * 1.5))
    with pytest.raises(GGUFError, match="rope_freqs.weight does not match"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "odd", progress=False)


def test_mlx_lm_load_with_tokenizer(tmp_path):
    from mlx_lm import load

    path = write_gguf(tmp_path / "g.gguf", "gemma3", types=(T.Q8_0, T.Q5_0, T.F32))
    folder = convert_gguf(path, tmp_path / "mlx", progress=False)
    model, tokenizer = load(str(folder))
    assert tokenizer.encode("ab", add_special_tokens=False)
    assert model(mx.array([IDS])).shape == (1, len(IDS), VOCAB)
    card = (folder / "README.md").read_text()
    assert "mit" in card and "sha256" in card


def test_native_quants_stay_quantized_and_match_mx_load(tmp_path):
    path = write_gguf(tmp_path / "l.gguf", "llama", types=NATIVE_TYPES)
    folder = convert_gguf(path, tmp_path / "mlx", progress=False)
    ours = mx.load(str(folder / "model.safetensors"))
    theirs = mx.load(str(path))  # MLX's own GGUF reader: Q4_0/Q4_1/Q8_0 -> affine
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    unpermute = {
        "attn_q": np.argsort(_permute(np.arange(HEADS * HEAD_DIM), HEADS)),
        "attn_k": np.argsort(_permute(np.arange(KV_HEADS * HEAD_DIM), KV_HEADS)),
    }
    from mlx_braces.conversion.gguf import mlx_name

    n_quant = 0
    for name, qtype in kinds.items():
        if qtype not in (T.Q4_0, T.Q4_1, T.Q8_0):
            continue
        n_quant += 1
        module = mlx_name(name, "llama").rsplit(".", 1)[0]
        rows = unpermute.get(name.split(".")[-2], slice(None))
        for part in ("weight", "scales", "biases"):
            a = np.array(ours[f"{module}.{part}"])
            b = np.array(theirs[name.replace("weight", part)])[rows]
            assert a.dtype == b.dtype and np.array_equal(
                a.view(np.uint8), b.view(np.uint8)
            )
        # ... and the values are exactly gguf's dequantization.
        bits = 8 if qtype == T.Q8_0 else 4
        back = mx.dequantize(
            ours[f"{module}.weight"],
            ours[f"{module}.scales"].astype(mx.float32),
            ours[f"{module}.biases"].astype(mx.float32),
            group_size=32,
            bits=bits,
        )
        t = next(t for t in reader.tensors if t.name == name)
        want = gguf.quants.dequantize(t.data, qtype).reshape(back.shape)[rows]
        assert np.array_equal(np.array(back), want)
    assert n_quant >= 6
    from mlx_lm.utils import load_model

    model, config = load_model(folder)
    layer = model.model.layers[0]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)  # Q8_0
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert isinstance(model.lm_head, nn.QuantizedLinear)  # Q4_0
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)  # Q4_1
    assert type(layer.self_attn.k_proj) is nn.Linear  # F16
    assert ours["model.layers.0.self_attn.k_proj.weight"].dtype == mx.float16
    assert ours["model.layers.0.self_attn.v_proj.weight"].dtype == mx.float32  # F32
    assert ours["model.norm.weight"].dtype == mx.float32  # F32 kept
    ref = reference_logits(path, IDS)
    assert _rel_err(mlx_logits(folder, IDS), ref) < 1e-2  # float16 scales/activations


def test_requantize(tmp_path, capsys):
    path = write_gguf(
        tmp_path / "q.gguf", "qwen2", types=(T.Q6_K, T.Q5_0, T.F32, T.Q8_0)
    )
    folder = convert_gguf(
        path, tmp_path / "mlx", q_bits=8, q_group_size=64, progress=False
    )
    err_line = capsys.readouterr().err
    assert "Re-quantized" in err_line and "largest absolute error" in err_line
    from mlx_lm.utils import load_model

    model, config = load_model(folder)
    q = config["quantization"]
    assert q["model.embed_tokens"] == {
        "group_size": 64,
        "bits": 8,
    }  # Q6_K, re-quantized
    assert q["model.layers.0.self_attn.v_proj"] == {"group_size": 32, "bits": 8}  # Q8_0
    assert all(
        isinstance(m, nn.QuantizedLinear)
        for _, m in model.model.layers[0].named_modules()
        if type(m).__name__.endswith("Linear")
    )
    largest = float(err_line.split("largest absolute error")[1].strip(" .\n:"))
    assert 0 < largest < 0.01
    assert _rel_err(mlx_logits(folder, IDS), reference_logits(path, IDS)) < 3e-2


def test_default_dtypes(tmp_path):
    # float16 scales are exact, and widened for a float32 target: gemma3's Q8_0
    # embedding must not start a float16 residual stream (docs/METHOD.md).
    for arch, want in (("llama", mx.float16), ("gemma3", mx.float32)):
        layers = 1 if arch == "llama" else None
        path = write_gguf(
            tmp_path / f"{arch}.gguf", arch, types=(T.Q8_0, T.Q5_0), n_layers=layers
        )
        for dtype, expect, scales in (
            (None, want, want),
            ("bfloat16",) + (mx.bfloat16,) * 2,
        ):
            folder = convert_gguf(
                path, tmp_path / f"{arch}-{dtype}", dtype=dtype, progress=False
            )
            w = mx.load(str(folder / "model.safetensors"))
            dense = [k for k in w if w[k].ndim == 2 and k[:-6] + "scales" not in w]
            assert len(dense) >= 3 and all(w[k].dtype == expect for k in dense)
            assert w["model.embed_tokens.scales"].dtype == (
                mx.float32 if scales == mx.float32 else mx.float16
            )
            assert w["model.norm.weight"].dtype == (dtype and expect or mx.float32)
        if arch == "gemma3":
            from mlx_lm.utils import load_model

            model, _ = load_model(tmp_path / f"{arch}-None")
            assert model.model.embed_tokens(mx.array([IDS])).dtype == mx.float32


def _one_line_error(fn, target: Path, match: str) -> None:
    with pytest.raises(GGUFError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    assert not target.exists()
    assert not any(p.name.endswith(".tmp") for p in target.parent.iterdir())


def test_bad_input(tmp_path):
    out = tmp_path / "out" / "mlx"
    out.parent.mkdir()
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n")
    _one_line_error(lambda: convert_gguf(text, out), out, "not a GGUF file")
    _one_line_error(
        lambda: convert_gguf(tmp_path / "none.gguf", out), out, "no such file"
    )

    good = write_gguf(tmp_path / "good.gguf", "llama", types=(T.Q8_0,), n_layers=1)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (len(data) - 100, 200, 30):
        cut.write_bytes(data[:size])
        _one_line_error(lambda: convert_gguf(cut, out), out, "truncated")

    llama = write_gguf(tmp_path / "llama.gguf", "llama", types=(T.F16,), n_layers=1)
    other = tmp_path / "gpt2x.gguf"
    _rewrite(llama, other, arch="gpt2x")
    _one_line_error(
        lambda: convert_gguf(other, out),
        out,
        r"architecture 'gpt2x' is not supported; supported: llama, qwen2, gemma3",
    )
    bad = tmp_path / "q8_1.gguf"  # a type the gguf package cannot dequantize
    _rewrite(llama, bad, raw=("blk.0.ffn_up.weight", T.Q8_1))
    _one_line_error(
        lambda: convert_gguf(bad, out), out, "tensor blk.0.ffn_up.weight has type Q8_1"
    )
    convert_gguf(good, out, progress=False)
    _one_line_error(lambda: convert_gguf(good, out), out.parent / "x", "already exists")


def _rewrite(
    src: Path, dest: Path, arch: str = "llama", raw=None, replace=None
) -> None:
    """Copy GGUF ``src`` as architecture ``arch``.

    ``raw`` = (tensor, type): that tensor becomes random blocks of the type;
    ``replace`` = (tensor, array): that tensor gets new float32 values.
    """
    rng = np.random.default_rng(0)

    def tensor(t, shape):
        if raw is not None and t.name == raw[0]:
            block, size = gguf.GGML_QUANT_SIZES[raw[1]]
            data = rng.integers(0, 256, (shape[0], shape[1] // block * size), np.uint8)
            return data, raw[1]
        if replace is not None and t.name == replace[0]:
            return np.asarray(replace[1], np.float32), None
        return np.array(t.data).reshape(shape), None

    copy_gguf(src, dest, tensor, arch=arch)


def test_cli(tmp_path):
    from mlx_braces.convert import main

    path = write_gguf(tmp_path / "l.gguf", "llama", types=(T.Q4_0,), n_layers=1)
    assert main(["--gguf", str(path), "--mlx-path", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_braces.convert",
            "--gguf",
            str(tmp_path / "bad.gguf"),
            "--mlx-path",
            str(tmp_path / "n"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("Error: ") and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr and not (tmp_path / "n").exists()


def test_cli_llama2c(tmp_path):
    from test_llama2c import TINY, TOK512, random_llama2c, write_llama2c

    from mlx_braces.convert import main

    ckpt = tmp_path / "tiny.bin"
    write_llama2c(ckpt, TINY, random_llama2c(np.random.default_rng(3), TINY, True), 0)
    out = tmp_path / "m"
    argv = ["--llama2c", str(ckpt), "--tokenizer", str(TOK512), "--mlx-path", str(out)]
    assert main(argv + ["--dtype", "bfloat16"]) == 0
    assert (
        mx.load(str(out / "model.safetensors"))["model.norm.weight"].dtype
        == mx.bfloat16
    )
    (tmp_path / "short.bin").write_bytes(b"\x01\x02")
    argv[1] = str(tmp_path / "short.bin")
    argv[-1] = str(tmp_path / "n")
    assert main(argv) == 2
