"""Braced FFNs: exactness at g = 0, the METHOD.md formula, quantized bases, caching."""

from __future__ import annotations

import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import quantize_model

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import CONFIGS, build, dense_weight, quantized  # noqa: E402

from mlx_braces.braces import (  # noqa: E402
    BracedFFN,
    apply_braces,
    braced_layers,
    orthonormal_rows,
    orthonormalize,
    value_projection,
)

TOKENS = mx.array([[3, 17, 42, 9, 100, 5, 77, 21]])
NO_GATE = float("-inf")  # sigmoid(-inf) == 0 exactly


def tiny(arch: str, bits: int | None = None) -> nn.Module:
    return build(arch) if bits is None else quantized(arch, bits)


def set_gate(model: nn.Module, value: float) -> None:
    for _, m in braced_layers(model):
        m.gate = mx.array([value], dtype=mx.float32)


def decode_logits(model: nn.Module, steps: int = 3) -> list[mx.array]:
    """Prefill TOKENS through a KV cache, then greedy-decode ``steps`` tokens."""
    cache = make_prompt_cache(model)
    logits = model(TOKENS, cache=cache)[:, -1:]
    out = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits, axis=-1), cache=cache)[:, -1:]
        out.append(logits)
    return out


# ---------------------------------------------------------------------------
# g = 0 is the base model exactly


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_zero_gate_is_base_model_exactly(arch, bits):
    base, model = tiny(arch, bits), tiny(arch, bits)
    apply_braces(model, rank=4, gate_init=NO_GATE, seed=1)
    assert len(braced_layers(model)) == 2
    assert mx.array_equal(model(TOKENS), base(TOKENS))
    for a, b in zip(decode_logits(model), decode_logits(base)):
        assert mx.array_equal(a, b)
    # The brace is really in the forward pass: an open gate changes the logits.
    set_gate(model, 2.0)
    assert not mx.allclose(model(TOKENS), base(TOKENS), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_matches_full_forward_with_open_gate(arch):
    model = build(arch)
    model.eval()
    apply_braces(model, rank=4, gate_init=1.0, seed=2)
    cache = make_prompt_cache(model)
    step = [model(TOKENS[:, :5], cache=cache)[:, -1]]
    step += [model(TOKENS[:, i : i + 1], cache=cache)[:, -1] for i in range(5, 8)]
    full = model(TOKENS)[0, 4:]
    assert mx.allclose(mx.concatenate(step), full, atol=1e-5, rtol=1e-4)


def word_tokenizer(vocab_size: int):
    """An in-memory word-level tokenizer (``t0 t1 ...``, no EOS) for mlx-lm's generate."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
def test_mlx_lm_generate(bits):
    tokenizer = word_tokenizer(128)
    prompt = TOKENS[0].tolist()
    base, model = tiny("qwen2", bits), tiny("qwen2", bits)
    for m in (base, model):
        m.eval()
    apply_braces(model, rank=4, gate_init=NO_GATE, seed=3)

    def tokens(m, **kw):
        steps = stream_generate(m, tokenizer, prompt, max_tokens=8, **kw)
        return [r.token for r in steps]

    assert tokens(model) == tokens(base)
    text = generate(model, tokenizer, prompt, max_tokens=8)
    assert text == generate(base, tokenizer, prompt, max_tokens=8)

    set_gate(model, 3.0)
    cache = make_prompt_cache(model)
    steps = list(stream_generate(model, tokenizer, prompt, 8, prompt_cache=cache))
    assert len(steps) == 8 and cache[0].offset >= len(prompt) + 7
    # Each step's log-probabilities equal a full forward pass without a cache.
    out = [r.token for r in steps]
    logits = model(mx.array([prompt + out]))[0, len(prompt) - 1 : -1]
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    got = mx.stack([r.logprobs for r in steps])
    assert mx.allclose(got, expected, atol=1e-4)
    first = next(iter(stream_generate(base, tokenizer, prompt, 1)))
    assert not mx.allclose(got[0], first.logprobs, atol=1e-3)


# ---------------------------------------------------------------------------
# The braced FFN computes METHOD.md's formula (numpy float64 reference)


def np_linear(layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(W (out, in), b (out,)) in float64; a quantized weight is dequantized here only."""
    W = np.array(dense_weight(layer).astype(mx.float32), dtype=np.float64)
    b = layer.get("bias")
    b = np.zeros(W.shape[0]) if b is None else np.array(b, dtype=np.float64)
    return W, b


def silu(z):
    return z / (1 + np.exp(-z))


def gelu(z):
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def gelu_approx(z):
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


# arch -> (kind, activation, input projections)
FFN_SPECS = {
    "llama": ("gated", silu, ["gate_proj", "up_proj"]),
    "gemma": ("gated", gelu, ["gate_proj", "up_proj"]),
    "gemma2": ("gated", gelu_approx, ["gate_proj", "up_proj"]),
    "phi3": ("fused", silu, ["gate_up_proj"]),
    "gpt2": ("plain", gelu_approx, ["c_fc"]),
    "starcoder2": ("plain", gelu, ["c_fc"]),
    "gpt_neox": ("plain", gelu_approx, ["dense_h_to_4h"]),
}


def contribution_weights(ffn: nn.Module, arch: str, x: np.ndarray) -> np.ndarray:
    """w(x), the input of the down projection, from the FFN's own weights."""
    kind, act, names = FFN_SPECS[arch]
    W, b = np_linear(getattr(ffn, names[0]))
    h = x @ W.T + b
    if kind == "plain":
        return act(h)
    if kind == "fused":
        gate, up = np.split(h, 2, axis=-1)
        return act(gate) * up
    W_up, b_up = np_linear(getattr(ffn, names[1]))
    return act(h) * (x @ W_up.T + b_up)


def reference_ffn(braced: BracedFFN, arch: str, x: np.ndarray, braces: bool = True):
    """FFN_braced(x) = W_V (w(x) + g (R W_V)ᵀ (R x) / sqrt(r)) + b, in float64."""
    W_V, b_V = np_linear(braced.down)
    R = np.array(braced.R, dtype=np.float64)
    g = 1 / (1 + math.exp(-braced.gate.item()))
    w = contribution_weights(braced.ffn, arch, x)
    r = ((x @ R.T) @ (R @ W_V)) / math.sqrt(R.shape[0])
    return (w + (g * r if braces else 0)) @ W_V.T + b_V


def check_against_reference(model: nn.Module, arch: str, gate: float = 1.5):
    _, braced = braced_layers(model)[-1]
    # An arbitrary (not orthonormal) R: the formula must hold for any R.
    braced.R = 0.5 * mx.random.normal(braced.R.shape, key=mx.random.key(7))
    braced.gate = mx.array([gate])
    x = mx.random.normal((2, 5, braced.dims), key=mx.random.key(8))
    out = np.array(braced(x), dtype=np.float64)
    xn = np.array(x, dtype=np.float64)
    ref = reference_ffn(braced, arch, xn)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * scale)
    # ... and the brace term is large enough for that comparison to mean something.
    assert (
        np.abs(ref - reference_ffn(braced, arch, xn, braces=False)).max() > 0.01 * scale
    )


@pytest.mark.parametrize("arch", list(FFN_SPECS))
def test_braced_ffn_matches_numpy(arch):
    model = build(arch)
    apply_braces(model, rank=8, seed=4)
    check_against_reference(model, arch)


@pytest.mark.parametrize(
    "bits,group_size,mode",
    [(4, 32, "affine"), (8, 32, "affine"), (4, 32, "mxfp4")],
    ids=["q4", "q8", "mxfp4"],
)
@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_quantized_braced_ffn_matches_numpy(arch, bits, group_size, mode):
    model = quantized(arch, bits, group_size, mode)
    apply_braces(model, rank=8, seed=5)
    _, braced = braced_layers(model)[-1]
    assert isinstance(braced.down, nn.QuantizedLinear) and braced.down.mode == mode
    check_against_reference(model, arch)


def test_unquantized_down_projection_in_a_quantized_model():
    """mlx-lm leaves a layer unquantized when its input width is not a multiple of
    the group size (here d_ff = 96, group 64): the brace must take the fp path."""
    arch = "llama"
    base, model = build(arch), build(arch)
    for m in (base, model):
        quantize_model(m, CONFIGS[arch], group_size=64, bits=4)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, nn.QuantizedLinear)
    assert type(mlp.down_proj) is nn.Linear
    apply_braces(model, rank=4, gate_init=NO_GATE, seed=6)
    assert mx.array_equal(model(TOKENS), base(TOKENS))
    check_against_reference(model, arch)


# ---------------------------------------------------------------------------
# A = R W_V on quantized weights, without a dequantized copy

QUANT_MODES = [("affine", b, 32) for b in (2, 3, 4, 5, 6, 8)] + [
    ("mxfp4", 4, 32),
    ("mxfp8", 8, 32),
    ("nvfp4", 4, 16),
]


@pytest.mark.parametrize("mode,bits,group_size", QUANT_MODES)
def test_value_projection_every_quantization_mode(mode, bits, group_size):
    linear = nn.Linear(128, 64, bias=False)
    q = nn.QuantizedLinear.from_linear(linear, group_size, bits, mode=mode)
    W = mx.dequantize(
        q.weight, q.scales, q.get("biases"), group_size=group_size, bits=bits, mode=mode
    )  # reference only
    R = orthonormal_rows(8, 64, key=mx.random.key(9))
    assert mx.allclose(value_projection(q, R), R @ W, atol=1e-5)
    # Its gradient w.r.t. R (which training needs) is the dequantized one too.
    cot = mx.random.normal((8, 128), key=mx.random.key(10))
    grad = mx.grad(lambda R: (value_projection(q, R) * cot).sum())(R)
    assert mx.allclose(grad, cot @ W.T, atol=1e-4)


def test_value_projection_never_dequantizes():
    """A 4096x11008 4-bit down projection: a dequantized fp32 copy is 180 MB, A is
    (16, 11008). Peak memory while computing A (and its gradient) stays far below."""
    d, d_ff, gs = 4096, 11008, 64
    q = nn.QuantizedLinear(d_ff, d, bias=False, group_size=gs, bits=4)
    keys = mx.random.split(mx.random.key(11), 3)
    packed = (d, d_ff * 4 // 32)  # eight 4-bit values per uint32
    q.weight = mx.random.randint(0, 2**31 - 1, packed, key=keys[0]).astype(mx.uint32)
    q.scales = 0.01 * mx.random.uniform(shape=(d, d_ff // gs), key=keys[1])
    q.biases = -8 * q.scales
    R = orthonormal_rows(16, d, key=keys[2])
    mx.eval(q.parameters(), R)
    dequantized_bytes = d * d_ff * 4

    mx.reset_peak_memory()
    before = mx.get_active_memory()
    A = value_projection(q, R)
    mx.eval(A)
    assert mx.get_peak_memory() - before < dequantized_bytes / 20
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(mx.grad(lambda R: value_projection(q, R).square().sum())(R))
    assert mx.get_peak_memory() - before < dequantized_bytes / 20

    cols = 1024  # check the values on the first columns (a cheaper reference)
    W = mx.dequantize(
        q.weight[:, : cols // 8],
        q.scales[:, : cols // gs],
        q.biases[:, : cols // gs],
        group_size=gs,
        bits=4,
    )
    assert mx.allclose(A[:, :cols], R @ W, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Inference: A cached once, invalidated when R changes; mx.compile


def test_apply_braces_keeps_eval_mode():
    model = build("llama")
    model.eval()  # as mlx_lm.load leaves it
    apply_braces(model, rank=4)
    assert all(not m.training for _, m in braced_layers(model))


def test_value_projection_cached_in_eval_until_R_changes():
    model = build("llama")
    model.eval()
    apply_braces(model, rank=4, gate_init=0.0, seed=12)
    _, braced = braced_layers(model)[0]
    A = braced.value_projection()
    assert braced.value_projection() is A
    y = model(TOKENS)
    assert braced.value_projection() is A  # the forward pass reused it

    orthonormalize(model)  # a new R (same values up to rounding)
    A2 = braced.value_projection()
    assert A2 is not A and braced.value_projection() is A2

    new_R = orthonormal_rows(4, braced.dims, key=mx.random.key(13))
    model.update({"model": {"layers": [{"mlp": {"R": new_R}}, {}]}})
    A3 = braced.value_projection()
    assert mx.allclose(A3, new_R @ braced.down.weight, atol=1e-6)
    assert not mx.allclose(model(TOKENS), y, atol=1e-4)  # the forward sees the new R


def test_no_cache_in_train_mode():
    model = build("llama")
    apply_braces(model, rank=4)
    assert model.training
    _, braced = braced_layers(model)[0]
    assert braced.value_projection() is not braced.value_projection()


def test_compile_in_eval_mode():
    model = build("llama")
    model.eval()
    apply_braces(model, rank=4, gate_init=0.0, seed=14)
    eager = model(TOKENS)
    for as_input in (False, True):  # R a captured constant, then a tracer
        fresh = build("llama")
        fresh.eval()
        apply_braces(fresh, rank=4, gate_init=0.0, seed=14)
        kw = {"inputs": fresh.state} if as_input else {}
        compiled = mx.compile(lambda t, m=fresh: m(t), **kw)
        assert mx.allclose(compiled(TOKENS), eager, atol=1e-5)
        assert mx.allclose(compiled(TOKENS), eager, atol=1e-5)
        # No tracer leaked into the cache: eager calls still work and agree.
        assert mx.allclose(fresh(TOKENS), eager, atol=1e-5)
        _, braced = braced_layers(fresh)[0]
        A = braced.value_projection()
        assert mx.allclose(A, value_projection(braced.down, braced.R))
