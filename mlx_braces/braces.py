"""Braced FFN layers: relevance-scored sub-updates (LLM Braces, METHOD.md §1-3, §5).

An FFN computes ``W_V · w(x)``: ``w(x)`` is the input of the down ("value") projection.
A brace adds ``g · r(x)`` to that input, with ``r(x) = (R W_V)ᵀ (R x) / sqrt(rank)``,
``R`` a (rank, d) matrix with orthonormal rows and ``g = sigmoid(ĝ)`` a per-layer gate.
The FFN's own code runs unchanged; only its down projection sees ``w + g·r`` (in
training; at inference the same sum is a rank-``d_r`` branch added to its output).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a full-precision or quantized linear layer."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.shape[-1] * layer.group_size, layer.weight.shape[0]
    out_dims, in_dims = layer.weight.shape
    return in_dims, out_dims


def _weight_matmul(down: nn.Module, X: mx.array, transpose: bool) -> mx.array:
    """``X W_V`` (``X Wᵀ_V`` with ``transpose``), never dequantizing a quantized W_V."""
    if isinstance(down, nn.QuantizedLinear):
        # W_V is stored (d, d_ff), quantized along d_ff.
        return mx.quantized_matmul(
            X.astype(down.scales.dtype) if down.mode == "affine" else X,
            down.weight,
            down.scales,
            down.get("biases"),
            transpose=transpose,
            group_size=down.group_size,
            bits=down.bits,
            mode=down.mode,
        )
    # Cast X, not W_V: an fp32 copy of a bf16 W_V would live until backward.
    W = down.weight
    return X.astype(W.dtype) @ (W.T if transpose else W)


def value_projection(down: nn.Module, R: mx.array) -> mx.array:
    """``A = R W_V``: (rank, d) -> (rank, d_ff), without a dequantized copy of ``W_V``."""
    return _weight_matmul(down, R, transpose=False)


def output_projection(down: nn.Module, A: mx.array) -> mx.array:
    """``A W_Vᵀ``: (rank, d_ff) -> (rank, d), the down projection's product, no bias."""
    return _weight_matmul(down, A, transpose=True)


def orthonormal_rows(rank: int, dims: int, key: mx.array | None = None) -> mx.array:
    """A random (rank, dims) matrix with orthonormal rows (fp32)."""
    return polar(mx.random.normal((rank, dims), key=key))


def polar(R: mx.array) -> mx.array:
    """The nearest matrix with orthonormal rows: ``(R Rᵀ)^(-1/2) R`` (fp32).

    Uses the (rank, rank) Gram matrix only, so it costs ``O(rank² · d)``; linalg runs
    on the CPU stream, which every backend has.
    """
    R = R.astype(mx.float32)
    for _ in range(2):  # the second pass removes the rounding of an ill-conditioned R
        lam, V = mx.linalg.eigh(R @ R.T, stream=mx.cpu)
        inv_sqrt = (V * mx.rsqrt(mx.maximum(lam, 1e-12))) @ V.T
        R = inv_sqrt @ R
    return R


class _Pending:
    """What the owning :class:`BracedFFN` adds during one call (a plain object)."""

    __slots__ = ("delta", "branch")

    def __init__(self):
        self.delta: mx.array | None = None  # (..., d_ff), added to the input
        self.branch: tuple[mx.array, mx.array] | None = None  # (z, Bᵀ)


class _AddToInput(nn.Module):
    """Stands in for the FFN's down projection: ``linear(w + delta) + z Bᵀ``.

    Set by the owning :class:`BracedFFN` for the duration of one call (in
    ``pending``): ``delta`` (..., d_ff) is added to the input (training, inspection),
    or ``branch`` ``(z, Bᵀ)`` adds the rank-``d_r`` term ``z Bᵀ`` (..., d) to the
    output (inference). ``record``, when a list, receives ``(w, delta)`` of every
    call (for inspection).
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.pending = _Pending()  # plain attributes: never part of the parameter tree
        self.record = None

    def __call__(self, w: mx.array) -> mx.array:
        delta, branch = self.pending.delta, self.pending.branch
        if self.record is not None:
            self.record.append((w, delta))
        if delta is not None:
            w = w + delta.astype(w.dtype)
        y = self["linear"](w)  # item access: Module.__getattr__ costs ~1 µs
        if branch is not None:
            y = mx.addmm(y, *branch)  # y + z Bᵀ: (..., rank) @ (rank, d)
        return y


def _concrete(value: Any) -> bool:
    """Evaluate ``value``; False inside ``mx.compile``, where it is a tracer (never cache it)."""
    try:
        mx.eval(value)
    except ValueError:
        return False
    return True


class _Memo:
    """Inference values derived from arrays, each kept while those very arrays stay.

    One rule for every entry: a value is served again only while every array it was
    computed from (its key) is the same object (identity, not value). An optimizer
    step, ``orthonormalize``, ``load_weights``, a new gate or new steering strengths
    replace an array and so invalidate what came from it. Only concrete values are
    kept, never an ``mx.compile`` tracer. Never consulted in train mode.
    """

    __slots__ = ("entries",)

    def __init__(self):
        self.entries: dict[Any, tuple[tuple, Any]] = {}

    def get(self, name: Any, key: tuple, compute: Callable[[], Any]) -> Any:
        hit = self.entries.get(name)
        if (
            hit is not None
            and len(hit[0]) == len(key)
            and all(map(operator.is_, hit[0], key))
        ):
            return hit[1]
        value = compute()
        if _concrete(value):
            self.entries[name] = (key, value)
        return value

    def value(self, name: Any) -> Any:
        """The value last kept under ``name`` (None if none)."""
        hit = self.entries.get(name)
        return None if hit is None else hit[1]


class BracedFFN(nn.Module):
    """An FFN block whose value-vector contributions get a gated relevance score.

    Trainable: ``R`` (rank, d), orthonormal rows, and ``gate`` (ĝ, shape (1,)).
    The wrapped FFN lives in ``ffn`` and is frozen. An optional conditional branch
    ``cond`` (:class:`mlx_braces.steering.Conditional`) adds attribute steering: the
    update becomes ``g·(r(x) + S r_c)`` (METHOD.md §4). This module only asks it for
    ``cond.term(self, x)`` (train path: ``S r_c``, per row of ``x``) and
    ``cond.offset(self, x)`` (inference: ``(S h_c) Rᵀ``); both are None unsteered.

    In train mode the update is added to the down projection's input exactly as
    written. At inference the same function runs as a rank-``d_r`` branch beside
    the FFN: ``W_V·g·r(x) = (R x)·Bᵀ`` with ``B = g·W_V Aᵀ/sqrt(rank)`` (d, rank), and
    ``r(x) + S r_c = r``-of-``(R x + (S h_c) Rᵀ)`` since ``r`` is linear in ``R x``.
    """

    def __init__(
        self,
        ffn: nn.Module,
        down_name: str,
        rank: int,
        gate_init: float = -5.0,
        key: mx.array | None = None,
    ):
        super().__init__()
        down = getattr(ffn, down_name)
        d_ff, d = linear_dims(down)
        if not 0 < rank <= d:
            raise ValueError(f"rank must be in 1..{d} (the model width), got {rank}")
        ffn.freeze()
        setattr(ffn, down_name, _AddToInput(down))
        self.ffn = ffn
        self.down_name = down_name
        self.rank = rank
        self.gate_init = gate_init
        self.dims = d
        self.hidden_dims = d_ff
        self.R = orthonormal_rows(rank, d, key)
        self.gate = mx.array([gate_init], dtype=mx.float32)
        self._memo = _Memo()  # the one inference cache (also for ``cond``'s offset)

    @property
    def down(self) -> nn.Module:
        """The frozen base down projection (``W_V``)."""
        return getattr(self.ffn, self.down_name).linear

    @property
    def g(self) -> mx.array:
        return mx.sigmoid(self.gate)

    def cached(self, name: Any, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept in this layer's memo under ``key`` outside training."""
        return compute() if self.training else self._memo.get(name, key, compute)

    def value_projection(self) -> mx.array:
        """``A = R W_V`` (rank, d_ff); cached outside training until R or W_V change."""
        down, R = self.down, self.R
        key = (R, *_weight_arrays(down))
        return self.cached("A", key, lambda: value_projection(down, R))

    def relevance(self, x: mx.array) -> mx.array:
        """``r(x) = (x Rᵀ) A / sqrt(rank)``: (..., d) -> (..., d_ff)."""
        R = self.R.astype(x.dtype)
        A = self.value_projection().astype(x.dtype)
        return ((x @ R.T) @ A) * (1.0 / math.sqrt(self.rank))

    def _inference_terms(
        self, dtype: mx.Dtype, output_side: bool, down: nn.Module
    ) -> tuple[mx.array, mx.array]:
        """``(Rᵀ, Bᵀ = g·A W_Vᵀ/sqrt(rank))``, or with ``output_side`` False
        ``(Rᵀ, g·A/sqrt(rank))``, in ``dtype``: (d, rank), (rank, d or d_ff)."""
        R, gate = self["R"], self["gate"]

        def compute() -> tuple[mx.array, mx.array]:
            M = self.value_projection()  # (rank, d_ff)
            if output_side:
                M = output_projection(down, M)  # (rank, d)
            scale = mx.sigmoid(gate) * (1.0 / math.sqrt(self.rank))
            return R.T.astype(dtype), (scale * M.astype(mx.float32)).astype(dtype)

        key = (R, gate, *_weight_arrays(down))
        return self._memo.get((output_side, dtype), key, compute)

    def _delta(self, x: mx.array, cond: nn.Module | None) -> mx.array:
        """``g·(r(x) + S r_c)`` for the down projection's input: (..., d_ff)."""
        r = self.relevance(x)
        term = None if cond is None else cond.term(self, x)  # constant over tokens
        if term is not None:
            r = r + term.astype(x.dtype)
        return self.g.astype(x.dtype) * r

    def __call__(self, x: mx.array, *args, **kwargs) -> Any:
        # Per layer and token: item access (self["ffn"]), not Module.__getattr__.
        ffn = self["ffn"]
        inject = ffn[self.down_name]
        pending = inject.pending
        cond = self.get("cond")
        if self.training:
            pending.delta = self._delta(x, cond)
        else:
            output_side = inject.record is None  # inspection reads the input's delta
            Rt, M = self._inference_terms(x.dtype, output_side, inject["linear"])
            offset = None if cond is None else cond.offset(self, x)
            if offset is None:
                z = x @ Rt  # (..., rank)
            else:
                z = mx.addmm(offset.astype(x.dtype), x, Rt)  # R x + (S h_c) Rᵀ
            if output_side:
                pending.branch = (z, M)
            else:
                pending.delta = z @ M
        try:
            return ffn(x, *args, **kwargs)
        finally:
            pending.delta = pending.branch = None


def _weight_arrays(down: nn.Module) -> tuple[mx.array | None, ...]:
    """The arrays ``W_V`` is made of (a quantized one has scales and biases)."""
    return down["weight"], down.get("scales"), down.get("biases")


# ---------------------------------------------------------------------------
# Finding FFNs in mlx-lm models


def model_type(model: nn.Module) -> str:
    """The mlx-lm ``model_type`` of ``model`` (for error messages)."""
    args = getattr(model, "args", None)
    return str(
        getattr(model, "model_type", None)
        or getattr(args, "model_type", None)
        or type(model).__module__.rsplit(".", 1)[-1]
    )


def _is_moe(module: nn.Module) -> bool:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return any(
        isinstance(m, (SwitchLinear, QuantizedSwitchLinear))
        for _, m in module.named_modules()
    )


def find_down_projection(module: nn.Module) -> str | None:
    """Name of ``module``'s down projection if ``module`` looks like an FFN, else None.

    An FFN has linear children d -> (d_ff or 2·d_ff) (up/gate/fc, or fused gate_up)
    and exactly one d_ff -> d (down), with d_ff != d. Attention blocks fail this test.
    """
    lins = {k: v for k, v in module.children().items() if isinstance(v, LINEAR_TYPES)}
    if not 2 <= len(lins) <= 3:  # q/k/v/o attention (e.g. Gemma-7B's 3072->4096) has 4
        return None
    dims = {k: linear_dims(v) for k, v in lins.items()}
    hits = []
    for name, (d_ff, d) in dims.items():
        others = [v for k, v in dims.items() if k != name]
        if d_ff != d and all(i == d and o in (d_ff, 2 * d_ff) for i, o in others):
            hits.append(name)
    # A non-gated FFN (fc, proj) passes both ways round: the down one contracts.
    hits = [h for h in hits if len(hits) == 1 or dims[h][0] > dims[h][1]]
    return hits[0] if len(hits) == 1 else None


def find_ffns(model: nn.Module) -> list[tuple[int, str, nn.Module, str]]:
    """``(block index, attribute, ffn module, down name)`` for every transformer block."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(
            f"Model type '{model_type(model)}' has no `layers`: "
            "not an mlx-lm language model mlx_braces can patch."
        )
    found = []
    for i, block in enumerate(layers):
        if _is_moe(block):
            raise ValueError(
                f"Model type '{model_type(model)}' has mixture-of-experts FFNs "
                f"(block {i}); mlx_braces does not brace MoE experts yet."
            )
        hits = [
            (name, m, down)
            for name, m in block.named_modules()
            if name and (down := find_down_projection(m)) is not None
        ]
        if len(hits) != 1:
            what = "no FFN" if not hits else f"{len(hits)} FFN candidates"
            raise ValueError(
                f"Model type '{model_type(model)}': found {what} in block {i} "
                f"({type(block).__name__}); expected one module with up/gate -> down "
                "linear projections."
            )
        found.append((i, *hits[0]))
    return found


# ---------------------------------------------------------------------------
# Public API


def apply_braces(
    model: nn.Module,
    rank: int = 16,
    num_layers: int = -1,
    gate_init: float = -5.0,
    seed: int | None = None,
) -> nn.Module:
    """Brace the FFNs of the last ``num_layers`` blocks (-1: all) of ``model`` in place.

    Every base weight is frozen; only the braces' ``R`` and ``gate`` are trainable.
    ``R`` is drawn from ``seed`` (or MLX's global random state). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be an mlx.nn.Module (an mlx-lm model), got "
            f"{type(model).__name__}"
        )
    if (
        isinstance(gate_init, bool)
        or not isinstance(gate_init, numbers.Real)
        or math.isnan(gate_init)
        or gate_init == math.inf
    ):
        raise ValueError(
            "gate_init must be a finite number or -inf (a closed gate, g = 0), "
            f"got {gate_init!r}"
        )
    gate_init = float(gate_init)
    if seed is not None and (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not 0 <= seed < 2**64
    ):
        raise ValueError(f"seed must be None or an integer in 0..2**64-1, got {seed!r}")
    if braced_layers(model):
        raise ValueError("Model is already braced; load a fresh model to brace again.")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    ffns = find_ffns(model)
    n = len(ffns)
    if num_layers == -1:
        num_layers = n
    if (
        isinstance(num_layers, bool)
        or not isinstance(num_layers, numbers.Integral)
        or not 1 <= num_layers <= n
    ):
        raise ValueError(
            f"num_layers must be -1 (all) or in 1..{n} for this model, got {num_layers!r}"
        )
    num_layers = int(num_layers)
    for _, _, ffn, down in ffns:
        d_ff, d = linear_dims(getattr(ffn, down))
        if rank > d:
            raise ValueError(
                f"rank must be at most the model width d={d}, got rank={rank}"
            )
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), n) if seed is not None else [None] * n
    for i, name, ffn, down in ffns[n - num_layers :]:
        block = model.layers[i]
        braced = BracedFFN(ffn, down, rank, gate_init, key=keys[i])
        braced.train(model.training)  # mlx_lm.load gives eval mode: keep it (A cache)
        parent, attr = parent_and_attr(block, name)
        setattr(parent, attr, braced)
    return model


def parent_and_attr(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the child at ``path`` (``a.b.0.c``), and that child's name."""
    *head, attr = path.split(".")
    parent = root
    for p in head:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    return parent, attr


def braced_layers(model: nn.Module) -> list[tuple[str, BracedFFN]]:
    """``(parameter path, module)`` of every braced FFN, in model order."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, BracedFFN)][::-1]


def orthonormalize(model: nn.Module) -> None:
    """Retract every brace's ``R`` onto orthonormal rows (call after each optimizer step)."""
    for _, m in braced_layers(model):
        m.R = polar(m.R)


def orthonormality_error(model: nn.Module) -> float:
    """``max |R Rᵀ - I|`` over all braced layers (fp32)."""
    errs = [mx.abs(m.R @ m.R.T - mx.eye(m.rank)).max() for _, m in braced_layers(model)]
    return max(e.item() for e in errs) if errs else 0.0


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``Trainable parameters: P% (xM/yM)`` exactly as mlx-lm does."""
    from mlx_lm.tuner.utils import print_trainable_parameters as _print

    _print(model)
