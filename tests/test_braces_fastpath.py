"""The inference fast path (a rank-d_r branch beside the FFN) equals the exact path.

At inference ``BracedFFN`` adds ``(R x + (S h_c) Rᵀ) Bᵀ`` with ``B = g·W_V Aᵀ/sqrt(r)``
to the down projection's output instead of ``g·(r(x) + S r_c)`` to its input. These
tests hold it to the train-mode (exact, uncached) path, to numpy float64 and to the
unpatched model, through a KV cache, and check when its cached terms are rebuilt.
"""

from __future__ import annotations

import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, os.path.dirname(__file__))
from test_braces import contribution_weights, np_linear  # noqa: E402
from tiny_models import build, quantized  # noqa: E402

from mlx_braces.braces import apply_braces, braced_layers  # noqa: E402
from mlx_braces.steering import install_attributes, steer  # noqa: E402

TOKENS = mx.array([[3, 17, 42, 9, 100, 5, 77, 21], [8, 1, 64, 2, 33, 90, 12, 4]])
ARCHS = ["llama", "phi3", "gpt2"]  # gated, fused gate/up, plain FFNs


def braced_model(arch: str, bits: int | None, steering: bool) -> nn.Module:
    """A braced tiny model (eval mode) with arbitrary R, open gates and live steering."""
    model = build(arch) if bits is None else quantized(arch, bits)
    apply_braces(model, rank=4, gate_init=0.0, seed=1)
    keys = iter(mx.random.split(mx.random.key(2), 64))
    for i, (_, m) in enumerate(braced_layers(model)):
        m.R = 0.5 * mx.random.normal(m.R.shape, key=next(keys))  # any R, not only
        m.gate = mx.array([0.5 + i])  # orthonormal rows: the algebra must hold
    if steering:
        d = braced_layers(model)[0][1].dims
        emb = [mx.random.normal((2, d), key=next(keys)) for _ in braced_layers(model)]
        install_attributes(model, {"a": ["x"], "b": ["y"]}, emb, hidden_dims=4, seed=3)
        for _, m in braced_layers(model):
            m.cond.out.weight = mx.random.normal(
                m.cond.out.weight.shape, key=next(keys)
            )
            m.cond.out.bias = mx.random.normal(m.cond.out.bias.shape, key=next(keys))
        steer(model, {"a": 1.5})
    model.eval()
    return model


def decode(model: nn.Module, tokens: mx.array = TOKENS, steps: int = 3) -> mx.array:
    """Prefill 5 tokens through a KV cache, then feed the rest one at a time."""
    cache = make_prompt_cache(model)
    out = [model(tokens[:, :5], cache=cache)]
    out += [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 5 + steps)]
    return mx.concatenate(out, axis=1).astype(mx.float32)


def exact(model: nn.Module, fn):
    """``fn()`` on the train-mode (exact, uncached) path."""
    model.train()
    try:
        return fn()
    finally:
        model.eval()


def fast_path_used(model: nn.Module) -> bool:
    return all(
        any(k[0] is True for k in m._memo.entries) for _, m in braced_layers(model)
    )


def close(a: mx.array, b: mx.array, tol: float = 1e-4) -> bool:
    scale = mx.abs(b).max().item()
    return mx.allclose(a, b, rtol=tol, atol=tol * scale).item()


@pytest.mark.parametrize("steering", [False, True], ids=["plain", "steered"])
@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_exact_path_through_kv_cache(arch, bits, steering):
    model = braced_model(arch, bits, steering)
    fast = decode(model)
    assert fast_path_used(model)
    slow = exact(model, lambda: decode(model))
    assert close(fast, slow)
    # Both equal a full forward pass without a cache (causal: same prefix logits).
    assert close(fast, model(TOKENS).astype(mx.float32)[:, :8])
    # The brace term is large enough for these comparisons to mean something.
    for _, m in braced_layers(model):
        m.gate = mx.array([-math.inf])
    assert not close(decode(model), fast, tol=1e-2)


def reference(m, arch: str, x: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """``W_V (w + g (r(x) + s r_c)) + b`` in float64 (METHOD.md §3-4)."""
    W_V, b_V = np_linear(m.down)
    R = np.array(m.R, dtype=np.float64)
    g = 1 / (1 + math.exp(-m.gate.item()))
    A = R @ W_V
    r = (x @ R.T) @ A / math.sqrt(m.rank)
    if s is not None:
        c = m.cond
        up, out = np_linear(c.up), np_linear(c.out)
        z = np.array(c.e, dtype=np.float64) @ up[0].T + up[1]
        h = (z / (1 + np.exp(-z))) @ out[0].T + out[1]  # (n_attr, d)
        r = r + s @ ((h @ R.T) @ A / math.sqrt(m.rank))
    return (contribution_weights(m.ffn, arch, x) + g * r) @ W_V.T + b_V


@pytest.mark.parametrize("steering", [False, True], ids=["plain", "steered"])
@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_matches_numpy(arch, bits, steering):
    model = braced_model(arch, bits, steering)
    x = mx.random.normal((2, 3, braced_layers(model)[0][1].dims), key=mx.random.key(9))
    for _, m in braced_layers(model):
        S = None if m.get("cond") is None else m.cond.strengths
        s = None if S is None else np.array(S, dtype=np.float64)
        ref = reference(m, arch, np.array(x, dtype=np.float64), s)
        for _ in range(2):  # filling the cache, then served from it
            out = np.array(m(x), dtype=np.float64)
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * abs(ref).max())
        assert any(k[0] is True for k in m._memo.entries)


def test_per_row_steering_on_the_fast_path():
    model = braced_model("llama", 4, steering=True)
    rows = [{"a": 2.0}, {"b": 1.5, "a": -1.0}]
    steer(model, rows)
    both = decode(model)
    assert close(both, exact(model, lambda: decode(model)))
    for i, row in enumerate(rows):
        steer(model, row)
        assert close(both[i], decode(model, TOKENS[i : i + 1])[0])
    steer(model, rows)
    with pytest.raises(ValueError, match="2 rows of strengths but the batch has 1"):
        model(TOKENS[:1])


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
def test_cache_is_rebuilt_when_its_sources_change(bits):
    model = braced_model("llama", bits, steering=True)
    _, m = braced_layers(model)[-1]
    before = decode(model)

    def changed() -> mx.array:
        """The fast path's logits now: they differ from ``before`` and are exact."""
        nonlocal before
        fast = decode(model)
        assert fast_path_used(model)
        assert not close(fast, before, tol=1e-3)
        assert close(fast, exact(model, lambda: decode(model)))
        before = fast
        return fast

    m.R = 1.3 * m.R  # new R
    changed()
    m.gate = m.gate + 1.0  # new gate
    changed()
    steer(model, {"b": -2.0})  # new strengths
    changed()
    m.cond.out.weight = 2.0 * m.cond.out.weight  # new attribute MLP
    changed()
    down = m.down
    if bits is None:
        down.weight = 1.5 * down.weight  # new W_V
    else:  # new quantized W_V: other scales (same packed weight) ...
        down.scales = 1.5 * down.scales
        changed()
        down.weight = mx.array(down.weight[::-1])  # ... and another packed weight
    changed()
    steer(model, None)  # steering off
    changed()
    # Equal arrays are a cache hit: the very same kept terms serve the next call.
    kept = {k: v[1] for k, v in m._memo.entries.items()}
    decode(model)
    assert all(m._memo.entries[k][1] is v for k, v in kept.items())


def test_train_mode_never_reads_the_cache():
    model = braced_model("llama", None, steering=True)
    clean = decode(model)  # fills every layer's cache
    for _, m in braced_layers(model):  # poison it under the same keys
        for k, (key, value) in list(m._memo.entries.items()):
            bad = (
                tuple(100 * v for v in value) if isinstance(value, tuple) else 0 * value
            )
            m._memo.entries[k] = (key, bad)
    assert not close(decode(model), clean, tol=1e-2)  # eval mode serves the cache
    assert close(exact(model, lambda: decode(model)), clean)  # train mode does not
    # Train mode keeps nothing, and its gradients reach R and the gate.
    model.train()
    for _, m in braced_layers(model):
        m._memo.entries.clear()

    def loss(params):
        model.update(params)
        return model(TOKENS).astype(mx.float32).square().mean()

    grads = mx.grad(loss)(model.trainable_parameters())
    assert all(not m._memo.entries for _, m in braced_layers(model))
    for layer in grads["model"]["layers"]:
        assert mx.abs(layer["mlp"]["R"]).max().item() > 0
        assert mx.abs(layer["mlp"]["gate"]).max().item() > 0


@pytest.mark.parametrize("steering", [False, True], ids=["plain", "steered"])
@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_gate_fast_path_is_base_model_exactly(arch, bits, steering):
    base = build(arch) if bits is None else quantized(arch, bits)
    base.eval()
    model = braced_model(arch, bits, steering)
    for _, m in braced_layers(model):
        m.gate = mx.array([-math.inf])  # sigmoid(-inf) == 0: B = 0
    assert mx.array_equal(decode(model), decode(base)).item()
    assert fast_path_used(model)


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
def test_recording_falls_back_to_the_input_side(bits):
    """Inspection reads ``g·(r(x) + S r_c)`` at the down projection's input."""
    model = braced_model("llama", bits, steering=True)
    x = mx.random.normal((1, 5, braced_layers(model)[0][1].dims), key=mx.random.key(4))
    for _, m in braced_layers(model):
        fast = m(x)
        inject = getattr(m.ffn, m.down_name)
        inject.record = []
        try:
            recorded = m(x)
            ((w, delta),) = inject.record
        finally:
            inject.record = None
        assert close(recorded, fast)
        want = exact(model, lambda m=m: m.g * (m.relevance(x) + m.cond.term(m, x)))
        assert close(delta, want)
        assert close(m(x), fast)  # and the fast path is back


def test_bfloat16_fast_path_close_to_exact():
    model = braced_model("llama", None, steering=True)
    model.set_dtype(mx.bfloat16)
    fast = decode(model)
    assert fast_path_used(model)
    assert close(fast, exact(model, lambda: decode(model)), tol=3e-2)
