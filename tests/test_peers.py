"""IA³ and LoReFT (mlx_braces.peers) against numpy float64 and the unpatched model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_attention_mask

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import CONFIGS, build, quantized  # noqa: E402

from mlx_braces.braces import trainable_parameter_count  # noqa: E402
from mlx_braces.peers import (  # noqa: E402
    IA3Linear,
    apply_ia3,
    apply_loreft,
    ia3_layers,
    last_positions,
    loreft_layers,
    loreft_orthonormality_error,
    positions_mask,
    retract,
    set_positions,
)

STORIES = (
    Path(__file__).resolve().parent.parent / "mlx_braces" / "assets" / "stories260K"
)
TOKENS = mx.array([[3, 17, 42, 9, 100, 5, 77, 21], [8, 1, 64, 33, 2, 90, 11, 4]])
PROMPT_LENGTHS = [6, 4]  # right-padded rows


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def loreft_numpy(layer, h: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """pyreft's ``h + Rᵀ(W h + b − R h)`` in float64 at the rows of ``mask``."""
    R, W, b = f64(layer.R), f64(layer.W), f64(layer.b)
    edited = h + (h @ W.T + b - h @ R.T) @ R
    return edited if mask is None else np.where(mask[..., None], edited, h)


def randomize_loreft(model: nn.Module, seed: int = 1) -> None:
    """Give every W, b values far from any zero edit (init is already random)."""
    rng = np.random.default_rng(seed)
    for _, m in loreft_layers(model):
        m.W = mx.array(rng.normal(0, 0.5, m.W.shape), mx.float32)
        m.b = mx.array(rng.normal(0, 0.5, m.b.shape), mx.float32)


def base_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Every frozen array by name, wrappers' extra path segments removed."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return {
        k.replace(".layer.", ".").replace(".linear.", "."): np.array(
            v.astype(mx.float32) if v.dtype == mx.bfloat16 else v  # lossless
        )
        for k, v in tree_flatten(model.parameters())
        if k not in trainable
    }


# ---------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_parameter_counts(arch):
    cfg = CONFIGS[arch]
    L, d, d_ff = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim", d // cfg["num_attention_heads"])
    d_q = cfg["num_attention_heads"] * head_dim
    d_kv = cfg["num_key_value_heads"] * head_dim

    model = build(arch)
    apply_ia3(model)
    # PEFT's defaults: llama scales k and v; qwen2 and gemma3 scale q and v.
    d_attn = 2 * d_kv if arch == "llama" else d_q + d_kv
    assert trainable_parameter_count(model) == L * (d_attn + d_ff)
    assert len(ia3_layers(model)) == 3 * L
    model = build(arch)
    apply_ia3(model, targets=("k_proj", "v_proj"))
    assert trainable_parameter_count(model) == L * (2 * d_kv + d_ff)

    for rank, layers in ((4, None), (3, [1])):
        model = build(arch)
        apply_loreft(model, rank, layers)
        n = L if layers is None else len(layers)
        assert trainable_parameter_count(model) == n * (2 * rank * d + rank)
        assert [i for i, _ in loreft_layers(model)] == (layers or list(range(L)))


# ---------------------------------------------------------------------------
# LoReFT: forward against numpy


def test_loreft_layer_matches_numpy():
    model = build("llama")
    apply_loreft(model, rank=4, layers=[0])
    randomize_loreft(model)
    wrapped = model.layers[0]
    h = mx.random.normal((2, 8, 64), key=mx.random.key(3))
    attn = create_attention_mask(h, None)
    mask = last_positions(PROMPT_LENGTHS, 8, 2)
    set_positions(model, mask)
    out = wrapped(h, attn, None)
    plain = wrapped.layer(h, attn, None)
    expected = loreft_numpy(wrapped, f64(plain), np.array(mask))
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-5)
    m = np.array(mask)
    assert np.array_equal(np.array(out)[~m], np.array(plain)[~m])  # bit-identical
    assert np.abs(f64(out) - f64(plain))[m].min() > 1e-3  # the edit is not empty


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_loreft_model_matches_numpy_on_captured_hidden_states(arch):
    """The whole model equals the unpatched one with numpy edits between its layers."""
    base, model = build(arch), build(arch)
    layers = [0, 1]
    apply_loreft(model, rank=3, layers=layers)
    randomize_loreft(model)
    mask = positions_mask(PROMPT_LENGTHS, 8, first=1, last=2)
    set_positions(model, mask)
    logits = model(TOKENS)

    # The unpatched model, run block by block (mlx-lm's own modules), with the
    # numpy intervention applied to each captured hidden state.
    inner = base.model
    h = inner.embed_tokens(TOKENS)
    if arch == "gemma3_text":
        h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    for i, block in enumerate(inner.layers):
        h = block(h, create_attention_mask(h, None), None)
        if i in layers:
            h = mx.array(
                loreft_numpy(model.layers[i], f64(h), np.array(mask)), mx.float32
            )
    h = inner.norm(h)
    ref = base.lm_head(h) if "lm_head" in base else inner.embed_tokens.as_linear(h)
    np.testing.assert_allclose(f64(logits), f64(ref), rtol=1e-4, atol=1e-4)
    assert np.abs(f64(logits) - f64(base(TOKENS))).max() > 1e-2


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loreft_zero_edit_is_base_model_exactly(arch, bits):
    """With W = R, b = 0 the edit is zero: logits equal the unpatched model's exactly."""
    make = (lambda: build(arch)) if bits is None else (lambda: quantized(arch, bits))
    base, model = make(), make()
    apply_loreft(model, rank=4)
    for _, m in loreft_layers(model):
        m.W = m.R
        m.b = mx.zeros_like(m.b)
    assert np.array_equal(np.array(model(TOKENS)), np.array(base(TOKENS)))


def test_loreft_half_precision():
    """bf16/fp16 models stay in their dtype and follow the numpy reference."""
    for dtype in (mx.bfloat16, mx.float16):
        model = build("llama")
        model.set_dtype(dtype)
        apply_loreft(model, rank=4, layers=[1])
        wrapped = model.layers[1]
        assert wrapped.R.dtype == wrapped.W.dtype == mx.float32
        h = mx.random.normal((2, 8, 64), key=mx.random.key(5)).astype(dtype)
        out = wrapped(h, "causal", None)
        assert out.dtype == dtype
        ref = loreft_numpy(wrapped, f64(wrapped.layer(h, "causal", None)), None)
        np.testing.assert_allclose(f64(out), ref, rtol=0.05, atol=0.05)
        assert model(TOKENS).dtype == dtype


# ---------------------------------------------------------------------------
# LoReFT: training keeps R orthonormal


def test_loreft_training_keeps_r_orthonormal():
    model, tokenizer = load(str(STORIES))
    L = len(model.layers)
    apply_loreft(model, rank=4, layers=[0, L - 1], seed=7)
    assert loreft_orthonormality_error(model) < 1e-5
    ids = tokenizer.encode("Once upon a time there was a little girl named Lily.")
    x, y = mx.array([ids[:-1]]), mx.array([ids[1:]])
    set_positions(model, last_positions([x.shape[1]], x.shape[1], 4))
    before = base_weights(model)
    start = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y).mean()

    opt = optim.Adam(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses, drift = [], 0.0
    for _ in range(8):
        loss, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        drift = max(drift, loreft_orthonormality_error(model))  # before retraction
        retract(model)
        losses.append(loss.item())
        assert loreft_orthonormality_error(model) < 1e-5
    assert drift > 1e-3  # Adam alone leaves the manifold: the retraction matters
    assert losses[-1] < losses[0]
    after = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    assert sorted(after) == sorted(start) and len(after) == 3 * 2
    for k in after:
        assert np.abs(after[k] - start[k]).max() > 1e-4, k  # R, W and b all moved
    now = base_weights(model)
    assert sorted(now) == sorted(before)
    assert all(np.array_equal(now[k], before[k]) for k in before)


# ---------------------------------------------------------------------------
# LoReFT: generation with a KV cache


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_loreft_kv_cache_generation(arch):
    """generate_step's cached tokens equal greedy decoding by full recomputation."""
    model = build(arch)
    apply_loreft(model, rank=4, layers=[1])
    randomize_loreft(model)
    prompt = TOKENS[0]
    for mask in (None, last_positions([len(prompt)], len(prompt), 3)):
        set_positions(model, mask)
        steps = zip(
            generate_step(prompt, model, max_tokens=6, sampler=greedy), range(6)
        )
        cached = [int(t) for (t, _), _ in steps]
        seq = prompt.tolist()
        for _ in range(6):
            seq.append(int(greedy(model(mx.array([seq]))[0, -1])))
        assert cached == seq[len(prompt) :]
    # The edit changes the generated text (else the comparison above proves little).
    base = build(arch)
    steps = zip(generate_step(prompt, base, max_tokens=6, sampler=greedy), range(6))
    set_positions(model, None)
    steps_edit = zip(
        generate_step(prompt, model, max_tokens=6, sampler=greedy), range(6)
    )
    assert [int(t) for (t, _), _ in steps] != [int(t) for (t, _), _ in steps_edit]


# ---------------------------------------------------------------------------
# Position masks


def test_positions_mask():
    got = np.array(positions_mask([5, 2, 0], 7, first=2, last=2))
    want = np.array(
        [
            [1, 1, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert np.array_equal(got, want)
    got = np.array(last_positions(mx.array([3, 7]), 7, 2))
    assert np.array_equal(got, np.array([[0, 1, 1, 0, 0, 0, 0], [0] * 5 + [1, 1]]) == 1)


def test_positions_inside_mx_compile():
    """set_positions inside a compiled function follows each call's lengths."""
    model = build("llama")
    apply_loreft(model, rank=4)
    randomize_loreft(model)

    def forward(x, lengths):
        set_positions(model, last_positions(lengths, x.shape[1], 2))
        return model(x)

    compiled = mx.compile(forward)
    outs = []
    for lengths in ([6, 4], [3, 8]):
        got = compiled(TOKENS, mx.array(lengths))
        assert np.array_equal(np.array(got), np.array(forward(TOKENS, lengths)))
        outs.append(np.array(got))
    assert not np.array_equal(outs[0], outs[1])


def test_bad_input():
    model = build("llama")
    with pytest.raises(ValueError, match="no LoReFT layers"):
        set_positions(model, None)
    with pytest.raises(ValueError, match="rank must be"):
        apply_loreft(model, rank=65)
    with pytest.raises(ValueError, match="layers must be"):
        apply_loreft(model, rank=2, layers=[2])
    with pytest.raises(ValueError, match="layers must be"):
        apply_loreft(model, rank=2, layers=[0, 0])
    apply_loreft(model, rank=2)
    with pytest.raises(ValueError, match="already has LoReFT"):
        apply_loreft(model, rank=2)
    with pytest.raises(ValueError, match=r"mask must be a \(B, T\)"):
        set_positions(model, mx.ones((8,)))
    set_positions(model, mx.ones((3, 8)))
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        model(TOKENS)
    with pytest.raises(ValueError, match="prompt_lengths must be integers"):
        last_positions([9], 8, 2)
    with pytest.raises(ValueError, match="targets must be"):
        apply_ia3(build("llama"), targets="k_proj")
    with pytest.raises(ValueError, match="no module with linear children"):
        apply_ia3(build("llama"), targets=("key", "value"))


def test_retract_without_loreft_is_noop():
    model = build("llama")
    before = base_weights(model)
    retract(model)
    assert loreft_orthonormality_error(model) == 0.0
    assert all(np.array_equal(v, before[k]) for k, v in base_weights(model).items())


# ---------------------------------------------------------------------------
# IA³


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_ia3_ones_is_base_model_exactly(arch, bits):
    make = (lambda: build(arch)) if bits is None else (lambda: quantized(arch, bits))
    base, model = make(), make()
    apply_ia3(model)
    assert all(np.all(np.array(m.scale) == 1.0) for _, m in ia3_layers(model))
    assert np.array_equal(np.array(model(TOKENS)), np.array(base(TOKENS)))


def randomize_ia3(model: nn.Module, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    for _, m in ia3_layers(model):
        m.scale = mx.array(rng.uniform(0.2, 2.0, m.scale.shape), mx.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ia3_linears_match_numpy(arch):
    """k/v (or q/v) outputs, bias included, and the down projection's input are scaled."""
    model = build(arch)
    apply_ia3(model)
    randomize_ia3(model)
    for path, m in ia3_layers(model):
        W = f64(m.linear.weight)
        bias = f64(m.linear.bias) if "bias" in m.linear else 0.0
        x = mx.random.normal((3, W.shape[1]), key=mx.random.key(len(path)))
        s = f64(m.scale)
        want = (f64(x) * s) @ W.T + bias if m.feedforward else (f64(x) @ W.T + bias) * s
        assert m.feedforward == path.endswith("down_proj")
        np.testing.assert_allclose(f64(m(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_ia3_model_equals_merged_weights(arch):
    """Random scales equal the unpatched model with the scales merged into W (PEFT)."""
    base, model = build(arch), build(arch)
    apply_ia3(model)
    randomize_ia3(model)
    merged = []
    for path, m in ia3_layers(model):
        s = m.scale
        if m.feedforward:
            merged.append((f"{path}.weight", m.linear.weight * s[None, :]))
        else:
            merged.append((f"{path}.weight", m.linear.weight * s[:, None]))
            if "bias" in m.linear:
                merged.append((f"{path}.bias", m.linear.bias * s))
    base.load_weights(merged, strict=False)
    np.testing.assert_allclose(
        f64(model(TOKENS)), f64(base(TOKENS)), rtol=1e-4, atol=1e-4
    )
    assert np.abs(f64(model(TOKENS)) - f64(build(arch)(TOKENS))).max() > 1e-2


def test_ia3_training_updates_only_scales():
    model = build("llama")
    model.set_dtype(mx.bfloat16)
    apply_ia3(model)
    assert all(isinstance(m, IA3Linear) for _, m in ia3_layers(model))
    before = base_weights(model)
    x, y = TOKENS[:, :-1], TOKENS[:, 1:]

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x).astype(mx.float32), y).mean()

    opt = optim.Adam(learning_rate=1e-2)
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert model(x).dtype == mx.bfloat16
    opt.update(model, grads)
    mx.eval(model.parameters())
    scales = [np.array(m.scale) for _, m in ia3_layers(model)]
    assert all(s.dtype == np.float32 and np.abs(s - 1).max() > 1e-3 for s in scales)
    now = base_weights(model)
    assert all(np.array_equal(now[k], before[k]) for k in before)
