"""Braces training invariants (orthonormal R, frozen base, parameter count) and bad input."""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import CONFIGS, build, quantized  # noqa: E402

from mlx_braces.braces import (  # noqa: E402
    apply_braces,
    braced_layers,
    orthonormality_error,
    orthonormalize,
    print_trainable_parameters,
    trainable_parameter_count,
)

D = 64  # tiny_models' width


def lm_loss(model: nn.Module, tokens: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()


def test_training_keeps_R_orthonormal_and_base_frozen():
    """Adam at lr 0.1 for 100 steps on a 4-bit model, retracting after each step."""
    model = quantized("llama", bits=4)
    apply_braces(model, rank=8, seed=0)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    base = {
        k: np.array(v)
        for k, v in tree_flatten(model.parameters())
        if k not in trainable
    }
    tokens = mx.random.randint(0, 128, (4, 17), key=mx.random.key(1))
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    optimizer = optim.Adam(learning_rate=0.1)

    loss, grads = loss_and_grad(model, tokens)
    for k, g in tree_flatten(grads):  # gradients reach every R and gate
        assert k.endswith((".R", ".gate")) and mx.abs(g).max().item() > 0, k
    first = loss.item()
    for _ in range(100):
        loss, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        orthonormalize(model)
        mx.eval(model.parameters(), optimizer.state)
        assert orthonormality_error(model) < 1e-4
    assert loss.item() < 0.95 * first

    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(base) | trainable
    for k, v in base.items():
        assert np.array_equal(np.array(after[k]), v), k


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("num_layers", [-1, 1])
def test_trainable_parameters_are_exactly_the_braces(arch, num_layers):
    model = quantized(arch, bits=4)
    apply_braces(model, rank=8, num_layers=num_layers)
    layers = 2 if num_layers == -1 else num_layers
    paths = [p for p, _ in braced_layers(model)]
    assert len(paths) == layers
    assert paths[-1].endswith(".1.mlp")  # the last blocks are braced
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == {f"{p}.{n}" for p in paths for n in ("R", "gate")}
    assert trainable_parameter_count(model) == layers * (8 * D + 1)
    assert all(trainable[f"{p}.R"].shape == (8, D) for p in paths)


def test_print_trainable_parameters(capsys):
    """mlx-lm's line; like for its LoRA layers, the total is the base model's size."""
    model = build("llama")
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    apply_braces(model, rank=8)
    print_trainable_parameters(model)
    t = 2 * (8 * D + 1)
    line = capsys.readouterr().out.strip()
    assert line == (
        f"Trainable parameters: {100 * t / total:.3f}% "
        f"({t / 1e6:.3f}M/{total / 1e6:.3f}M)"
    )


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("rank", [0, -1, D + 1, 2.5, "4", True])
def test_bad_rank(rank):
    model = build("llama")
    with pytest.raises(ValueError, match="rank"):
        apply_braces(model, rank=rank)
    assert braced_layers(model) == []


@pytest.mark.parametrize("num_layers", [0, 3, -2, 1.5])
def test_bad_num_layers(num_layers):
    model = build("llama")
    with pytest.raises(ValueError, match=r"num_layers.*1\.\.2"):
        apply_braces(model, num_layers=num_layers)
    assert braced_layers(model) == []


def test_already_braced():
    model = build("llama")
    apply_braces(model, rank=4)
    with pytest.raises(ValueError, match="already braced"):
        apply_braces(model, rank=4)


class _Args:
    model_type = "toy"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.mix = nn.Linear(D, D)


class _Toy(nn.Module):
    """A model with blocks but no FFN-like linears."""

    def __init__(self):
        super().__init__()
        self.args = _Args()
        self.layers = [_Block(), _Block()]


def test_model_without_ffn():
    with pytest.raises(ValueError, match="Model type 'toy': found no FFN in block 0"):
        apply_braces(_Toy())


def test_model_without_layers():
    with pytest.raises(ValueError, match="no `layers`"):
        apply_braces(nn.Linear(4, 4))


MOE_CONFIGS = {
    "mixtral": dict(CONFIGS["llama"], model_type="mixtral", num_local_experts=4),
    "qwen2_moe": dict(
        CONFIGS["qwen2"],
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
}


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_mixture_of_experts_is_braced(arch):
    """One R and gate per MoE block, shared by its experts (tests/test_moe.py)."""
    model_class, args_class = _get_classes(MOE_CONFIGS[arch])
    model = model_class(args_class.from_dict(MOE_CONFIGS[arch]))
    apply_braces(model, rank=8)
    layers = braced_layers(model)
    assert [type(m).__name__ for _, m in layers] == ["BracedMoE"] * 2
    assert [m.num_experts for _, m in layers] == [4, 4]
    assert trainable_parameter_count(model) == 2 * (8 * D + 1)


def test_attention_with_wide_heads_is_not_an_ffn():
    """Gemma-7B's attention (d=3072 -> 16 heads x 256, MHA) has FFN-like shapes."""
    model = build("gemma", head_dim=32, num_key_value_heads=4)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, D)
    apply_braces(model, rank=4)
    assert [p for p, _ in braced_layers(model)] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
