"""Peer PEFT methods mlx-lm lacks, for the quality benchmark: IA³ and LoReFT.

IA³ (Liu et al. 2022, as in PEFT's ``tuners/ia3``): learned vectors, initialised to 1,
scale the outputs of two attention projections and the input of the FFN's down
projection. LoReFT (Wu et al. 2024, as pyreft's ``LoreftIntervention``): the output
hidden state ``h`` of chosen decoder layers becomes ``h + Rᵀ(W h + b − R h)`` at
chosen positions, ``R`` (rank, d) with orthonormal rows (kept so by :func:`retract`
after each optimizer update), ``W``, ``b`` a learned (rank, d) linear map.

Both freeze the base model; their parameters are fp32 and are cast to the
activations' dtype at use, so they run on fp32, bf16/fp16 and quantized bases.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_braces.braces import (
    LINEAR_TYPES,
    find_ffns,
    linear_dims,
    model_type,
    orthonormal_rows,
    parent_and_attr,
    polar,
)

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, attention part (the FFN
# part is always the down projection, PEFT's feedforward module for these types).
IA3_ATTENTION_TARGETS = {
    "llama": ("k_proj", "v_proj"),
    "mistral": ("k_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
}
DEFAULT_IA3_ATTENTION_TARGETS = ("k_proj", "v_proj")


# ---------------------------------------------------------------------------
# IA³


class IA3Linear(nn.Module):
    """A frozen linear whose output (or, ``feedforward``, input) is scaled by ``scale``.

    Trainable: ``scale`` (out_dims,) or (in_dims,) with ``feedforward``, fp32, init 1.
    """

    def __init__(self, linear: nn.Module, feedforward: bool):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        linear.freeze()
        self.linear = linear
        self.feedforward = feedforward
        self.scale = mx.ones((in_dims if feedforward else out_dims,), mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        scale = self["scale"].astype(x.dtype)
        if self.feedforward:
            return self["linear"](x * scale)  # (..., d_ff) scaled, then W_down
        y = self["linear"](x)
        return y * scale.astype(y.dtype)  # (..., out_dims), bias included (as PEFT)


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    """``(parameter path, module)`` of every IA³-scaled linear, in model order."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, IA3Linear)][::-1]


def _attention_targets(block: nn.Module, names: tuple[str, ...], i: int, mt: str):
    """``(path, linear)`` of each of ``names`` in ``block``'s attention module."""
    for path, m in block.named_modules():
        kids = m.children()
        if path and all(isinstance(kids.get(n), LINEAR_TYPES) for n in names):
            return [(f"{path}.{n}", kids[n]) for n in names]
    raise ValueError(
        f"Model type '{mt}': block {i} ({type(block).__name__}) has no module with "
        f"linear children {', '.join(names)} (IA³ attention targets)."
    )


def apply_ia3(model: nn.Module, targets: tuple[str, ...] | None = None) -> None:
    """Freeze ``model`` and add IA³ scales (trainable, init 1) to every block.

    ``targets``: the attention projections whose outputs are scaled; None takes
    PEFT's default for the model type (llama/mistral: k_proj, v_proj; gemma*,
    qwen2/3: q_proj, v_proj). The FFN's down projection input is always scaled.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
    if ia3_layers(model):
        raise ValueError("Model already has IA³ scales; load a fresh model.")
    mt = model_type(model)
    if targets is None:
        targets = IA3_ATTENTION_TARGETS.get(mt, DEFAULT_IA3_ATTENTION_TARGETS)
    if (
        isinstance(targets, str)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ValueError(
            f"targets must be a non-empty tuple of projection names, got {targets!r}"
        )
    targets = tuple(targets)
    ffns = find_ffns(model)
    plan = []
    for i, name, _ffn, down in ffns:
        block = model.layers[i]
        attn = _attention_targets(block, targets, i, mt)
        plan.append((block, attn, f"{name}.{down}"))
    model.freeze()
    for block, attn, down_path in plan:
        for path, linear in attn:
            parent, attr = parent_and_attr(block, path)
            setattr(parent, attr, IA3Linear(linear, feedforward=False))
        parent, attr = parent_and_attr(block, down_path)
        setattr(parent, attr, IA3Linear(getattr(parent, attr), feedforward=True))


# ---------------------------------------------------------------------------
# LoReFT


class _Positions:
    """Which positions a :class:`LoReFTLayer` edits (a plain object, not a parameter)."""

    __slots__ = ("mask",)

    def __init__(self):
        self.mask: mx.array | None = None  # (B or 1, T) bool; None: every position


class LoReFTLayer(nn.Module):
    """A decoder layer whose output ``h`` becomes ``h + Rᵀ(W h + b − R h)`` where masked.

    Trainable: ``R`` (rank, d) orthonormal rows, ``W`` (rank, d), ``b`` (rank,), fp32.
    The wrapped layer lives in ``layer``, frozen, called with its own arguments
    (``layer(h, mask, cache)``); its other attributes (``use_sliding``, ...) show
    through. The position mask indexes absolute positions: with a KV cache the
    block at ``cache.offset`` is read, and positions past the mask are not edited.
    """

    def __init__(self, layer: nn.Module, dims: int, rank: int, key: mx.array):
        super().__init__()
        k_r, k_w, k_b = mx.random.split(key, 3)
        layer.freeze()
        self.layer = layer
        self.rank = rank
        self.dims = dims
        self.R = orthonormal_rows(rank, dims, k_r)  # pyreft: orthogonal init
        bound = 1.0 / math.sqrt(dims)  # torch.nn.Linear's default init (pyreft's W, b)
        self.W = mx.random.uniform(-bound, bound, (rank, dims), key=k_w)
        self.b = mx.random.uniform(-bound, bound, (rank,), key=k_b)
        self.positions = _Positions()

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "layer" not in self:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
        return getattr(self["layer"], key)

    def intervene(self, h: mx.array, offset: int = 0) -> mx.array:
        """``h`` (B, L, d) edited at the masked positions ``offset .. offset+L-1``."""
        dt = h.dtype
        R = self["R"].astype(dt)
        z = h @ self["W"].T.astype(dt) + self["b"].astype(dt)  # (B, L, rank): W h + b
        edited = h + (z - h @ R.T) @ R  # (B, L, d)
        mask = self.positions.mask
        if mask is None:
            return edited
        L = h.shape[1]
        m = mask[:, offset : offset + L]
        if m.shape[1] < L:  # past the mask (generated tokens): not edited
            pad = mx.zeros((m.shape[0], L - m.shape[1]), mx.bool_)
            m = mx.concatenate([m, pad], axis=1)
        return mx.where(m[..., None], edited, h)

    def __call__(self, x: mx.array, *args, **kwargs) -> Any:
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        offset = getattr(cache, "offset", 0) if cache is not None else 0
        if self.positions.mask is not None and not isinstance(offset, int):
            raise ValueError(
                "LoReFT position masks need a cache with an integer offset "
                f"(one sequence offset), got {type(cache).__name__}; use mask None"
            )
        mask = self.positions.mask
        if mask is not None and mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"LoReFT position mask has {mask.shape[0]} rows for a batch of "
                f"{x.shape[0]}; set_positions expects (B, T) with B = batch size"
            )
        h = self["layer"](x, *args, **kwargs)
        return self.intervene(h, offset)


def loreft_layers(model: nn.Module) -> list[tuple[int, LoReFTLayer]]:
    """``(block index, module)`` of every LoReFT-wrapped decoder layer."""
    layers = getattr(model, "layers", None) or []
    return [(i, m) for i, m in enumerate(layers) if isinstance(m, LoReFTLayer)]


def _replace_block(model: nn.Module, block: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``block`` sits in the model's own list of layers.

    ``model.layers`` may be a fresh slice (qwen2's ``pipeline_layers``), so the list
    that holds ``block`` in the parameter tree is searched for by identity.
    """
    for _, m in model.named_modules():
        for v in m.values():
            if isinstance(v, list):
                for j, x in enumerate(v):
                    if x is block:
                        v[j] = new
                        return
    raise ValueError(f"Model type '{model_type(model)}': decoder layer not found")


def apply_loreft(
    model: nn.Module, rank: int, layers: list[int] | None = None, seed: int = 0
) -> None:
    """Freeze ``model`` and wrap decoder layers ``layers`` (None: all) with LoReFT.

    Each wrapped layer gets its own ``R``, ``W``, ``b`` drawn from ``seed``. Edits
    every position until :func:`set_positions` chooses some.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
    blocks = getattr(model, "layers", None)
    if not blocks:
        raise ValueError(
            f"Model type '{model_type(model)}' has no `layers`: not an mlx-lm model"
        )
    if loreft_layers(model):
        raise ValueError("Model already has LoReFT layers; load a fresh model.")
    n = len(blocks)
    if layers is None:
        layers = list(range(n))
    if not isinstance(layers, (str, bytes)) and hasattr(layers, "__iter__"):
        layers = list(layers)
    if (
        not isinstance(layers, list)
        or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < n
            for i in layers
        )
        or len(set(layers)) != len(layers)
        or not layers
    ):
        raise ValueError(
            f"layers must be None or distinct layer indices in 0..{n - 1}, "
            f"got {layers!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _, _, ffn, down = find_ffns(model)[0]
    dims = linear_dims(getattr(ffn, down))[1]  # the residual width d
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= dims:
        raise ValueError(
            f"rank must be an integer in 1..{dims} (the width), got {rank!r}"
        )
    model.freeze()
    keys = mx.random.split(mx.random.key(int(seed)), n)
    for i in sorted(int(i) for i in layers):
        block = blocks[i]
        wrapped = LoReFTLayer(block, dims, rank, keys[i])
        wrapped.train(model.training)
        _replace_block(model, block, wrapped)


def _require_loreft(model: nn.Module) -> list[tuple[int, LoReFTLayer]]:
    found = loreft_layers(model)
    if not found:
        raise ValueError("Model has no LoReFT layers: call apply_loreft first.")
    return found


def set_positions(model: nn.Module, mask: mx.array | None) -> None:
    """Edit only where ``mask`` (B, T), nonzero = edit, is set; None edits everywhere."""
    layers = _require_loreft(model)
    if mask is not None:
        if not isinstance(mask, mx.array) or mask.ndim != 2:
            what = getattr(mask, "shape", type(mask).__name__)
            raise ValueError(f"mask must be a (B, T) mx.array or None, got {what}")
        mask = mask if mask.dtype == mx.bool_ else mask != 0
    for _, m in layers:
        m.positions.mask = mask


def positions_mask(
    prompt_lengths: list[int] | mx.array,
    total_length: int,
    first: int = 0,
    last: int = 0,
) -> mx.array:
    """(B, T) bool: the first ``first`` and last ``last`` prompt positions of each row.

    Rows are right-padded: row b's prompt occupies positions 0 .. len_b - 1.
    pyreft's "f7+l7" is ``first=7, last=7`` (the two sets may overlap).
    """
    for name, v in (("total_length", total_length), ("first", first), ("last", last)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if not isinstance(prompt_lengths, mx.array):  # an mx.array may be a compile tracer
        if not all(
            isinstance(n, numbers.Integral) and 0 <= n <= total_length
            for n in prompt_lengths
        ):
            raise ValueError(
                f"prompt_lengths must be integers in 0..total_length={total_length}, "
                f"got {list(prompt_lengths)!r}"
            )
    lengths = mx.array(prompt_lengths).astype(mx.int32).reshape(-1)  # (B,)
    pos = mx.arange(total_length)[None, :]  # (1, T)
    n = lengths[:, None]  # (B, 1)
    head = pos < mx.minimum(n, first)
    tail = (pos >= n - last) & (pos < n)
    return head | tail


def last_positions(
    prompt_lengths: list[int] | mx.array, total_length: int, p: int
) -> mx.array:
    """(B, T) bool: the last ``p`` prompt positions of each right-padded row."""
    return positions_mask(prompt_lengths, total_length, first=0, last=p)


def retract(model: nn.Module) -> None:
    """Re-orthonormalize every LoReFT ``R`` (polar retraction; call after each update)."""
    for _, m in loreft_layers(model):
        m.R = polar(m.R)


def loreft_orthonormality_error(model: nn.Module) -> float:
    """``max |R Rᵀ − I|`` over all LoReFT layers (0.0 without LoReFT)."""
    errs = [
        mx.abs(m.R @ m.R.T - mx.eye(m.rank)).max().item()
        for _, m in loreft_layers(model)
    ]
    return max(errs) if errs else 0.0
