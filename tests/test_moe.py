"""Braced mixture-of-experts blocks: g = 0, a float64 reference, training, steering,
adapters (METHOD.md §7, "Mixture of experts")."""

from __future__ import annotations

import json
import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import MOE_ARCHS, build, dense_weight, quantized  # noqa: E402

REFERENCE_ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")  # reference_block's routers

from mlx_braces.adapters import AdapterError, load_adapter, save_adapter  # noqa: E402
from mlx_braces.braces import (  # noqa: E402
    BracedFFN,
    BracedMoE,
    apply_braces,
    braced_layers,
    find_ffns,
    orthonormality_error,
    orthonormalize,
    trainable_parameter_count,
)
from mlx_braces.steering import install_attributes, steer  # noqa: E402

D, RANK, E, TOP_K = 64, 8, 8, 2
NO_GATE = float("-inf")  # sigmoid(-inf) == 0 exactly
# 2 x 20 tokens x top-2 = 80 >= 64 routed rows: mlx-lm's switch sorts them by expert;
# a 3-token prompt and one-token decoding take the unsorted path.
TOKENS = mx.random.randint(0, 128, (2, 20), key=mx.random.key(3))


def tiny(arch: str, bits: int | None, **overrides) -> nn.Module:
    return build(arch, **overrides) if bits is None else quantized(arch, **overrides)


def moe_block(model: nn.Module, i: int) -> BracedMoE:
    block = model.model.layers[i]
    return block["block_sparse_moe" if "block_sparse_moe" in block else "mlp"]


def decode(model: nn.Module, steps: int = 3) -> list[mx.array]:
    """Prefill a 3-token prompt through a KV cache, then greedy-decode ``steps``."""
    cache = make_prompt_cache(model)
    logits = model(TOKENS[:1, :3], cache=cache)[:, -1:]
    out = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits, axis=-1), cache=cache)[:, -1:]
        out.append(logits)
    return out


# ---------------------------------------------------------------------------
# g = 0 is the unpatched model exactly


@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_zero_gate_is_the_base_model_exactly(arch, bits):
    base, model = tiny(arch, bits), tiny(arch, bits)
    apply_braces(model, rank=RANK, gate_init=NO_GATE, seed=0)
    layers = [m for _, m in braced_layers(model)]
    dense_first = arch == "deepseek_v3"  # first_k_dense_replace=1
    assert [type(m) for m in layers] == [
        BracedFFN if dense_first else BracedMoE,
        BracedMoE,
    ]
    assert layers[1].shared_paths == (
        ("shared_expert.down_proj",) if arch == "qwen2_moe"
        else ("shared_experts.down_proj",) if arch == "deepseek_v3" else ()
    )  # fmt: skip
    if bits:
        assert isinstance(layers[1].down, QuantizedSwitchLinear)
    assert mx.array_equal(model(TOKENS), base(TOKENS))  # sorted routing
    for a, b in zip(decode(model), decode(base)):  # unsorted, through a KV cache
        assert mx.array_equal(a, b)
    model.train()  # both train forms: A of every expert, then per row
    assert mx.array_equal(model(TOKENS), base(TOKENS))
    for a, b in zip(decode(model), decode(base)):
        assert mx.array_equal(a, b)


def test_zero_gate_bfloat16():
    """A bf16 4-bit MoE stays bf16 and exact at g = 0 (the cached A is fp32)."""

    def make() -> nn.Module:
        model = build("qwen3_moe")
        model.set_dtype(mx.bfloat16)
        nn.quantize(model, group_size=32, bits=4)
        return model

    base, model = make(), make()
    apply_braces(model, rank=RANK, gate_init=NO_GATE, seed=0)
    out = model(TOKENS)
    assert out.dtype == mx.bfloat16 and mx.array_equal(out, base(TOKENS))
    for a, b in zip(decode(model), decode(base)):
        assert mx.array_equal(a, b)


@pytest.mark.parametrize(
    "mode, bits, group_size",
    [("affine", 4, 32), ("affine", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)],
)
def test_expert_value_projection_never_dequantizes(mode, bits, group_size):
    """``A_e = R W_V^e`` by one gathered quantized matmul, for every mode."""
    model = quantized("qwen3_moe", bits=bits, group_size=group_size, mode=mode)
    apply_braces(model, rank=RANK, seed=0)
    braced = moe_block(model, 0)
    assert isinstance(braced.down, QuantizedSwitchLinear) and braced.down.mode == mode
    want = np.einsum("rd,edf->erf", f64(braced.R), expert_weights(braced.down))
    got = f64(braced.value_projection())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_dense_and_moe_blocks_in_one_model():
    """Qwen3-MoE's ``mlp_only_layers``: block 0 dense, block 1 routed experts."""
    base = quantized("qwen3_moe", mlp_only_layers=[0])
    model = quantized("qwen3_moe", mlp_only_layers=[0])
    apply_braces(model, rank=RANK, gate_init=NO_GATE, seed=0)
    assert [type(m) for _, m in braced_layers(model)] == [BracedFFN, BracedMoE]
    assert mx.array_equal(model(TOKENS), base(TOKENS))
    assert trainable_parameter_count(model) == 2 * (RANK * D + 1)


def test_dense_only_callers_still_refuse_moe():
    with pytest.raises(ValueError, match="Model type 'mixtral' has mixture-of-experts"):
        find_ffns(build("mixtral"))


# ---------------------------------------------------------------------------
# A float64 numpy reference of the routed braced FFN


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def expert_weights(layer: nn.Module) -> np.ndarray:
    """(E, out, in) float64 weights of a (quantized) SwitchLinear."""
    if isinstance(layer, QuantizedSwitchLinear):
        return f64(
            mx.dequantize(
                layer.weight,
                layer.scales,
                layer.get("biases"),
                group_size=layer.group_size,
                bits=layer.bits,
                mode=layer.mode,
            )
        )
    return f64(layer.weight)


def silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def softmax(a: np.ndarray) -> np.ndarray:
    a = np.exp(a - a.max(axis=-1, keepdims=True))
    return a / a.sum(axis=-1, keepdims=True)


def glu(x: np.ndarray, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(x @ gate.T) * (x @ up.T)


def reference_block(
    arch: str, braced: BracedMoE, x: np.ndarray, inds: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """The braced MoE block in float64: ``Σ_k s_k W_V^e (h_e + g W_V^eᵀ Rᵀ z/√rank)``
    for the routed experts ``inds`` (N, k), plus a braced shared expert; ``z`` (N, rank)
    is ``R x`` (plus any steering offset)."""
    moe = braced.ffn
    switch = moe.switch_mlp.switch
    Wg, Wu = expert_weights(switch.gate_proj), expert_weights(switch.up_proj)
    Wd = expert_weights(switch.down_proj.linear)  # (E, d, d_ff)
    R, g = f64(braced.R), 1.0 / (1.0 + math.exp(-braced.gate.item()))
    u = z @ R / math.sqrt(RANK)  # (N, d): Rᵀ z / sqrt(rank)
    logits = x @ f64(dense_weight(moe.gate)).T  # (N, E)
    probs = softmax(logits)
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        chosen = inds[n]
        if arch == "mixtral":
            scores = softmax(logits[n, chosen])
        else:
            scores = probs[n, chosen]
            if arch == "qwen3_moe":
                scores = scores / scores.sum()
        for s, e in zip(scores, chosen):
            h = glu(x[n], Wg[e], Wu[e])  # (d_ff,)
            r = Wd[e].T @ u[n]  # r_e(x): (d_ff,)
            y[n] += s * (Wd[e] @ (h + g * r))
    if arch == "qwen2_moe":
        mlp = moe.shared_expert
        Wsd = f64(dense_weight(mlp.down_proj.linear))
        h = glu(x, f64(dense_weight(mlp.gate_proj)), f64(dense_weight(mlp.up_proj)))
        shared = (h + g * (u @ Wsd)) @ Wsd.T
        y += shared / (1.0 + np.exp(-(x @ f64(dense_weight(moe.shared_expert_gate)).T)))
    return y


def routed_call(braced: BracedMoE, x: mx.array) -> tuple[mx.array, np.ndarray]:
    """``braced(x)`` and the top-k indices its router chose, (N, k)."""
    routed = braced.ffn.switch_mlp
    routed.record = []
    try:
        y = braced(x)
        mx.eval(y)
    finally:
        record, routed.record = routed.record, None
    ((_, inds),) = record
    return y, np.array(inds).reshape(-1, TOP_K)


# Routed rows (tokens x top-2) >= 64: sorted by expert; > E·rank = 64: train mode
# uses A of every expert, else W_V^eᵀ(Rᵀ R x) per row.
@pytest.mark.parametrize(
    "tokens", [40, 32, 3], ids=["sorted-all-A", "sorted-per-row", "unsorted-per-row"]
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bits", [None, 4], ids=["fp", "q4"])
@pytest.mark.parametrize("arch", REFERENCE_ARCHS)
def test_braced_block_matches_float64_reference(arch, bits, train, tokens):
    model = tiny(arch, bits)
    apply_braces(model, rank=RANK, gate_init=0.5, seed=1)
    braced = moe_block(model, 1)
    braced.train(train)
    x = mx.random.normal((tokens, D), key=mx.random.key(7))
    y, inds = routed_call(braced, x)
    x64 = f64(x)
    want = reference_block(arch, braced, x64, inds, x64 @ f64(braced.R).T)
    base = reference_block(arch, braced, x64, inds, 0 * x64[:, :RANK])
    assert np.abs(want - base).max() > 0.1 * np.abs(base).max()  # the brace acts
    np.testing.assert_allclose(f64(y), want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_both_train_forms_give_the_same_gradients(arch):
    """3 tokens (6 rows: per-row W_V^eᵀ(Rᵀ R x)) and the same 3 tokens 11 times over
    (66 rows, sorted: A of every expert) have the same mean loss and gradients."""
    model = quantized(arch)
    apply_braces(model, rank=RANK, gate_init=0.5, seed=0)
    braced = moe_block(model, 1)
    braced.train()
    x = mx.random.normal((3, D), key=mx.random.key(4))
    c = mx.random.normal((D,), key=mx.random.key(6))

    def loss(params, x):
        braced.update(params)
        return (braced(x) @ c).mean()

    params = braced.trainable_parameters()
    few = mx.grad(loss)(params, x)
    many = mx.grad(loss)(params, mx.tile(x, (11, 1)))
    for (k, a), (_, b) in zip(tree_flatten(few), tree_flatten(many)):
        assert mx.abs(a).max().item() > 0, k
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


def test_relevance_is_per_expert():
    """``r_e(x) = (R W_V^e)ᵀ (R x)/sqrt(rank)`` for every expert, (..., E, d_ff)."""
    model = quantized("qwen3_moe")
    apply_braces(model, rank=RANK, seed=0)
    braced = moe_block(model, 0)
    x = mx.random.normal((5, D), key=mx.random.key(2))
    Wd = expert_weights(braced.down)
    R = f64(braced.R)
    want = np.einsum("edf,nd->nef", Wd, f64(x) @ R.T @ R) / math.sqrt(RANK)
    got = f64(braced.relevance(x))
    assert got.shape == (5, E, 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------
# Steering


def steered_model(arch: str) -> tuple[nn.Module, list[np.ndarray]]:
    """A braced 4-bit model with two attributes and a live conditional MLP."""
    model = quantized(arch)
    apply_braces(model, rank=RANK, gate_init=0.5, seed=0)
    key = mx.random.key(5)
    embeddings = [mx.random.normal((2, D), key=k) for k in mx.random.split(key, 2)]
    install_attributes(
        model, {"a": ["x"], "b": ["y"]}, embeddings, hidden_dims=8, contrast=False
    )
    for i, (_, m) in enumerate(braced_layers(model)):
        m.cond.out.weight = mx.random.normal((D, 8), key=mx.random.key(10 + i))
    return model, embeddings


def hidden(cond) -> np.ndarray:
    """``h_c = MLP(e_c)`` in float64: (n_attr, d)."""
    up = f64(cond.e) @ f64(cond.up.weight).T + f64(cond.up.bias)
    return silu(up) @ f64(cond.out.weight).T + f64(cond.out.bias)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_steering_an_moe_block_matches_float64_reference(arch, train):
    """Per-row strengths ``S`` (B, n_attr): each routed expert gets
    ``g·(r_e(x) + Σ_c s_c r_{c,e})``, ``r_{c,e} = W_V^eᵀ Rᵀ R h_c/√rank``."""
    model, _ = steered_model(arch)
    model.train(train)
    braced = moe_block(model, 1)
    x = mx.random.normal((2, 20, D), key=mx.random.key(8))  # 80 rows: sorted
    S = [{"a": 1.5}, {"b": -2.0, "a": 0.5}]
    steer(model, S)
    y, inds = routed_call(braced, x)
    steer(model, None)
    plain, _ = routed_call(braced, x)
    moved = np.abs(f64(y) - f64(plain)).max()
    assert moved > 0.05 * np.abs(f64(plain)).max()  # steering moves the output

    x64 = f64(x).reshape(-1, D)
    R = f64(braced.R)
    S64 = np.array([[1.5, 0.0], [0.5, -2.0]])
    offset = np.repeat(S64 @ hidden(braced.cond) @ R.T, 20, axis=0)  # (N, rank)
    want = reference_block(arch, braced, x64, inds, x64 @ R.T + offset)
    got = f64(y).reshape(-1, D)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())

    r_c = f64(braced.cond.relevance(braced))  # (n_attr, E, d_ff): r_c per expert
    Wd = expert_weights(braced.down)
    want_rc = np.einsum("edf,cd->cef", Wd, hidden(braced.cond) @ R.T @ R)
    np.testing.assert_allclose(r_c, want_rc / math.sqrt(RANK), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Training


def lm_loss(model: nn.Module, tokens: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_training_keeps_R_orthonormal_and_base_bit_identical(arch):
    """Adam at lr 0.1 for 40 steps on a 4-bit MoE model, retracting after each."""
    model = quantized(arch)
    apply_braces(model, rank=RANK, seed=0)
    model.train()
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable_parameter_count(model) == 2 * (RANK * D + 1)
    base = {
        k: np.array(v)
        for k, v in tree_flatten(model.parameters())
        if k not in trainable
    }
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    optimizer = optim.Adam(learning_rate=0.1)
    loss, grads = loss_and_grad(model, TOKENS)
    for k, g in tree_flatten(grads):  # gradients reach every R and gate
        assert k.endswith((".R", ".gate")) and mx.abs(g).max().item() > 0, k
    first = loss.item()
    for _ in range(40):
        loss, grads = loss_and_grad(model, TOKENS)
        optimizer.update(model, grads)
        orthonormalize(model)
        mx.eval(model.parameters(), optimizer.state)
        assert orthonormality_error(model) < 1e-4
    assert loss.item() < 0.95 * first
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(base) | trainable
    for k, v in base.items():
        assert np.array_equal(np.array(after[k]), v), k


# ---------------------------------------------------------------------------
# Adapters


def trained(arch: str, **overrides) -> nn.Module:
    model = quantized(arch, **overrides)
    apply_braces(model, rank=RANK, gate_init=0.5, seed=0)
    for i, (_, m) in enumerate(braced_layers(model)):
        m.R = mx.linalg.qr(mx.random.normal((D, RANK), key=mx.random.key(i)),
                           stream=mx.cpu)[0].T  # fmt: skip
        m.gate = mx.array([0.3 * i - 0.2])
    return model


def test_adapter_round_trip(tmp_path):
    model = trained("qwen3_moe", mlp_only_layers=[0])
    save_adapter(model, tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"experts": [\n            0,\n            8\n' in config
    fresh = load_adapter(quantized("qwen3_moe", mlp_only_layers=[0]), tmp_path)
    assert [type(m) for _, m in braced_layers(fresh)] == [BracedFFN, BracedMoE]
    assert mx.array_equal(fresh(TOKENS), model.eval()(TOKENS))


@pytest.mark.parametrize(
    "saved, base, message",
    [
        ("qwen3", "qwen3_moe", "is a dense FFN, this one's model.layers.0.mlp is a "
         "mixture of 8 experts"),
        ("qwen3_moe", "qwen3", "is a mixture of 8 experts, this one's "
         "model.layers.0.mlp is a dense FFN"),
    ],
)  # fmt: skip
def test_dense_and_moe_adapters_do_not_mix(tmp_path, saved, base, message):
    save_adapter(trained(saved), tmp_path)
    with pytest.raises(AdapterError) as e:
        load_adapter(quantized(base), tmp_path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "adapter_config.json"))
    assert message in text


def test_bad_experts_field(tmp_path):
    save_adapter(trained("qwen3_moe"), tmp_path)
    file = tmp_path / "adapter_config.json"
    config = json.loads(file.read_text())
    config["braces_parameters"]["experts"] = [8]  # two layers
    file.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"braces_parameters.experts must list one"):
        load_adapter(quantized("qwen3_moe"), tmp_path)


def test_inspect_refuses_moe_blocks_in_one_line():
    """mlx_braces.inspect reads dense FFNs only: an MoE block is named, not crashed on."""
    from mlx_braces.lens import InspectError, capture

    model = build("qwen3_moe")
    apply_braces(model, rank=4, seed=0)
    with pytest.raises(InspectError, match=r"block\(s\) 0, 1 are mixture-of-experts"):
        capture(model, [1, 2, 3])
