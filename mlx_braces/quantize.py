"""Quantize a base model in memory, or dequantize one for hardware with slow 4-bit kernels.

MLX's CPU ``quantized_matmul`` runs at ~2 GFLOP/s whatever the BLAS, while an fp32
matmul on OpenBLAS runs at ~150 (README, "Linux CPU"). :func:`dequantize_model` turns
every quantized layer back into a full-precision one with ``mx.dequantize``, which is
exact: the weights are the same numbers, so a braces adapter trained on the dequantized
model is valid on the quantized one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

# The fastest on the MLX CPU backend with OpenBLAS (scripts/bench_cpu.py): bf16 and
# fp16 matmuls do not go through the BLAS.
DEFAULT_DTYPE = "float32"
DTYPES = {
    "float32": mx.float32,
    "fp32": mx.float32,
    "bfloat16": mx.bfloat16,
    "bf16": mx.bfloat16,
    "float16": mx.float16,
    "fp16": mx.float16,
}


class QuantizeError(ValueError):
    """A dequantization dtype that is not a floating-point type MLX computes in."""


def dequantize_dtype(value: bool | str | mx.Dtype | None) -> mx.Dtype | None:
    """The dtype that ``dequantize=value`` asks for: None for False/None, the default
    for True, else ``float32``/``bfloat16``/``float16`` (or fp32/bf16/fp16, mx.Dtype)."""
    if value is None or value is False:
        return None
    if value is True:
        return DTYPES[DEFAULT_DTYPE]
    if isinstance(value, mx.Dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.strip().lower() in DTYPES:
        return DTYPES[value.strip().lower()]
    raise QuantizeError(
        f"dequantize: expected float32, bfloat16 or float16 (or true for "
        f"{DEFAULT_DTYPE}), got {value!r}"
    )


def dtype_name(dtype: mx.Dtype) -> str:
    """``mx.float32`` -> ``"float32"``."""
    return str(dtype).split(".")[-1]


def _dequantized(m: nn.Module, dtype: mx.Dtype) -> mx.array:
    """The full-precision weight of a QuantizedLinear/QuantizedEmbedding, in ``dtype``."""
    extra = {"global_scale": m["global_scale"]} if "global_scale" in m else {}
    return mx.dequantize(
        m["weight"],
        m["scales"],
        m.get("biases"),
        group_size=m.group_size,
        bits=m.bits,
        mode=getattr(m, "mode", "affine"),
        dtype=dtype,
        **extra,
    )


def fast_dtype() -> str | None:
    """ "float32" where MLX runs on the CPU, whose quantized matmuls are ~25x slower
    than its float ones (README "Linux CPU"); None (stay quantized) elsewhere."""
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else None


def add_dequantize_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--dequantize [DTYPE]`` on a CLI's ``parser``; ``what`` is what it runs on."""

    def dtype_arg(value: str) -> str:
        try:
            return dtype_name(dequantize_dtype(value))
        except QuantizeError as e:
            raise argparse.ArgumentTypeError(
                str(e).removeprefix("dequantize: ")
            ) from None

    parser.add_argument(
        "--dequantize",
        nargs="?",
        const=DEFAULT_DTYPE,
        type=dtype_arg,
        metavar="DTYPE",
        help=f"{what} the quantized model dequantized in memory (exactly) to DTYPE: "
        f"{DEFAULT_DTYPE} (the default), bfloat16 or float16. Faster where quantized "
        "kernels are slow (Linux CPU); adapters stay valid on the quantized model.",
    )


def dequantize_model(model: nn.Module, dtype: mx.Dtype | str = mx.float32) -> nn.Module:
    """Replace every QuantizedLinear/QuantizedEmbedding of ``model`` by its exact
    full-precision counterpart (weights and bias in ``dtype``), in place; returns it.

    Other parameters (norms, unquantized layers) are left as they are.
    """
    dtype = dequantize_dtype(dtype) if not isinstance(dtype, mx.Dtype) else dtype
    if dtype not in DTYPES.values():
        raise QuantizeError(f"dequantize: {dtype} is not float32, bfloat16 or float16")
    replaced = []
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            weight = _dequantized(m, dtype)  # (out_dims, in_dims)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
            if "bias" in m:
                layer.bias = m["bias"].astype(dtype)
        elif isinstance(m, nn.QuantizedEmbedding):
            weight = _dequantized(m, dtype)  # (num_embeddings, dims)
            layer = nn.Embedding(*weight.shape)
        else:
            continue
        layer.weight = weight
        if "weight" not in m.trainable_parameters():  # frozen stays frozen
            layer.freeze()
        replaced.append((name, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
        mx.eval(model.parameters())
    return model


def is_quantized(model: nn.Module) -> bool:
    """True if ``model`` has a quantized linear or embedding layer."""
    return any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for _, m in model.named_modules()
    )


def quantize_base(
    model: nn.Module, config: dict[str, Any], bits: int = 4, group_size: int = 64
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a full-precision base in memory exactly as mlx-lm's convert would."""
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # its bits-per-weight line
        return quantize_model(model, config, group_size=group_size, bits=bits)
