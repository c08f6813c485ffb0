"""Tiny random mlx-lm models of every supported architecture, built offline for tests."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes

# Sizes every architecture shares; _COMMON adds what the Llama-like ones name alike.
_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
    max_position_embeddings=256,
)
_COMMON = dict(_SIZES, intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5)

CONFIGS = {
    "llama": dict(_COMMON, model_type="llama"),
    "mistral": dict(_COMMON, model_type="mistral"),
    "qwen2": dict(_COMMON, model_type="qwen2"),
    "qwen3": dict(
        _COMMON,
        model_type="qwen3",
        head_dim=16,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    "gemma": dict(_COMMON, model_type="gemma", head_dim=16),
    "gemma2": dict(
        _COMMON,
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
    ),
    "gemma3_text": dict(
        _COMMON,
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=32,
        sliding_window_pattern=2,
    ),
    "olmo2": dict(_COMMON, model_type="olmo2"),
    "cohere": dict(_COMMON, model_type="cohere", layer_norm_eps=1e-5),
    "phi3": dict(_COMMON, model_type="phi3"),
    "starcoder2": dict(_COMMON, model_type="starcoder2", norm_epsilon=1e-5),
    "gpt2": dict(
        model_type="gpt2",
        n_ctx=256,
        n_embd=64,
        n_head=4,
        n_layer=2,
        n_positions=256,
        layer_norm_epsilon=1e-5,
        vocab_size=128,
    ),
    "gpt_neox": dict(
        _SIZES,
        model_type="gpt_neox",
        layer_norm_eps=1e-5,
        rotary_emb_base=10000,
        rotary_pct=0.25,
    ),
    "phi": dict(
        _SIZES,
        model_type="phi",
        intermediate_size=96,
        num_key_value_heads=4,
        layer_norm_eps=1e-5,
        partial_rotary_factor=0.5,
    ),
}

# Mixture-of-experts architectures: 8 experts of width 32, top 2 (width 64, 2 layers);
# apart from CONFIGS, which the dense tests run over.
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MOE_CONFIGS = {
    "qwen3_moe": dict(
        CONFIGS["qwen3"],
        **_MOE,
        model_type="qwen3_moe",
        num_experts=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    ),
    "mixtral": dict(
        _COMMON, model_type="mixtral", num_local_experts=8, intermediate_size=32
    ),
    "qwen2_moe": dict(  # routed experts plus a gated shared expert
        _COMMON,
        **_MOE,
        model_type="qwen2_moe",
        num_experts=8,
        shared_expert_intermediate_size=96,
    ),
    "olmoe": dict(
        _SIZES,
        **_MOE,
        model_type="olmoe",
        intermediate_size=32,
        rms_norm_eps=1e-5,
        num_experts=8,
    ),
    "gpt_oss": dict(  # d_ff == d, biases, sliding and full attention
        _SIZES,
        model_type="gpt_oss",
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=64,
        head_dim=16,
        num_key_value_heads=2,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "deepseek_v3": dict(  # block 0 dense, block 1 routed experts plus a shared one
        _SIZES,
        model_type="deepseek_v3",
        intermediate_size=96,
        moe_intermediate_size=32,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
    ),
}
MOE_ARCHS = tuple(MOE_CONFIGS)


def build(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised mlx-lm model of ``arch`` with non-trivial norms/biases."""
    config = dict(CONFIGS.get(arch) or MOE_CONFIGS[arch], **overrides)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    params = []
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(model.parameters()):
        if "norm" in k or "ln" in k:
            params.append((k, 1.0 + 0.1 * mx.random.normal(v.shape)))
        else:
            params.append((k, 0.08 * mx.random.normal(v.shape)))
    model.load_weights(params)
    mx.eval(model.parameters())
    return model


def dense_weight(layer: nn.Module) -> mx.array:
    """The weight of a linear or embedding, dequantized if quantized (for references)."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    return layer.weight


def quantized(
    arch: str, bits: int = 4, group_size: int = 32, mode: str = "affine", **overrides
):
    """A tiny model quantized the way mlx-lm quantizes (embeddings and linears)."""
    model = build(arch, **overrides)
    nn.quantize(model, group_size=group_size, bits=bits, mode=mode)
    mx.eval(model.parameters())
    return model
