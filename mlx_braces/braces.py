"""Braced FFN layers: relevance-scored sub-updates (LLM Braces, METHOD.md §1-3, §5).

An FFN computes ``W_V · w(x)``: ``w(x)`` is the input of the down ("value") projection.
A brace adds ``g · r(x)`` to that input, with ``r(x) = (R W_V)ᵀ (R x) / sqrt(rank)``,
``R`` a (rank, d) matrix with orthonormal rows and ``g = sigmoid(ĝ)`` a per-layer gate.
The FFN's own code runs unchanged; only its down projection sees ``w + g·r``.
"""

from __future__ import annotations

import math
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


def value_projection(down: nn.Module, R: mx.array) -> mx.array:
    """``A = R W_V`` (rank, d_ff) without forming a dequantized copy of ``W_V``."""
    if isinstance(down, nn.QuantizedLinear):
        # W_V is stored (d, d_ff), quantized along d_ff: R (r, d) @ W_V (d, d_ff).
        return mx.quantized_matmul(
            R.astype(down.scales.dtype) if down.mode == "affine" else R,
            down.weight,
            down.scales,
            down.get("biases"),
            transpose=False,
            group_size=down.group_size,
            bits=down.bits,
            mode=down.mode,
        )
    # Cast R (rank, d), not W_V: an fp32 copy of a bf16 W_V would live until backward.
    return R.astype(down.weight.dtype) @ down.weight


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


class _AddToInput(nn.Module):
    """Stands in for the FFN's down projection: ``linear(w + delta)``.

    ``delta`` is set by the owning :class:`BracedFFN` for the duration of one call;
    ``record``, when a list, receives ``(w, delta)`` of every call (for inspection).
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.delta = None  # plain attributes: never part of the parameter tree
        self.record = None

    def __call__(self, w: mx.array) -> mx.array:
        if self.record is not None:
            self.record.append((w, self.delta))
        if self.delta is not None:
            w = w + self.delta.astype(w.dtype)
        return self.linear(w)


class _ValueCache:
    """Values derived from ``R``, ``W_V`` (...) kept while those arrays are unchanged.

    Inference only; ``key`` holds the very arrays the values came from, so an optimizer
    step or ``load_weights`` (which replace them) invalidates it.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.A: mx.array | None = None
        self.terms: tuple | None = None


def _concrete(value: Any) -> bool:
    """Evaluate ``value``; False inside ``mx.compile``, where it is a tracer (never cache it)."""
    try:
        mx.eval(value)
    except ValueError:
        return False
    return True


def _same(cached: tuple | None, key: tuple) -> bool:
    """True if ``cached`` holds exactly the objects of ``key`` (identity, not value)."""
    return (
        cached is not None
        and len(cached) == len(key)
        and all(a is b for a, b in zip(cached, key))
    )


class _Steering:
    """Attribute strengths ``S`` and the cached ``S r_c`` (a plain object, no params)."""

    def __init__(self):
        self.strengths: mx.array | None = None  # (n_attr,) or (B, n_attr)
        self.key: tuple[mx.array, ...] | None = None
        self.term: mx.array | None = None


class BracedFFN(nn.Module):
    """An FFN block whose value-vector contributions get a gated relevance score.

    Trainable: ``R`` (rank, d), orthonormal rows, and ``gate`` (ĝ, shape (1,)).
    The wrapped FFN lives in ``ffn`` and is frozen. An optional conditional branch
    ``cond`` (see :mod:`mlx_braces.steering`) maps attributes to ``h_c`` (n_attr, d);
    with strengths ``S`` set, the update is ``g·(r(x) + S r_c)`` (METHOD.md §4).
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
        self._cache = _ValueCache()
        self._fast = _ValueCache()
        self._steering = _Steering()

    @property
    def down(self) -> nn.Module:
        """The frozen base down projection (``W_V``)."""
        return getattr(self.ffn, self.down_name).linear

    @property
    def g(self) -> mx.array:
        return mx.sigmoid(self.gate)

    def value_projection(self) -> mx.array:
        """``A = R W_V`` (rank, d_ff); cached outside training until R or W_V change."""
        down = self.down
        key = (self.R, down.weight)
        cache = self._cache
        if not self.training and _same(cache.key, key):
            return cache.A
        A = value_projection(down, self.R)
        if not self.training and _concrete(A):
            cache.key, cache.A = key, A
        return A

    def relevance(self, x: mx.array) -> mx.array:
        """``r(x) = (x Rᵀ) A / sqrt(rank)``: (..., d) -> (..., d_ff)."""
        R = self.R.astype(x.dtype)
        A = self.value_projection().astype(x.dtype)
        return ((x @ R.T) @ A) * (1.0 / math.sqrt(self.rank))

    @property
    def steering(self) -> mx.array | None:
        """Attribute strengths ``S``: None, (n_attr,) for all rows, or (B, n_attr)."""
        return self._steering.strengths

    def set_steering(self, strengths: mx.array | None) -> None:
        """Set (or clear, with None) the strengths ``S`` used by the next calls."""
        if strengths is not None:
            cond = self.get("cond")
            n = None if cond is None else cond.e.shape[0]
            if strengths.ndim not in (1, 2) or strengths.shape[-1] != n:
                raise ValueError(
                    f"steering strengths must have shape (n_attr,) or (B, n_attr) with "
                    f"n_attr={n}, got {tuple(strengths.shape)}"
                )
        self._steering.strengths = strengths

    def attribute_relevance(self) -> mx.array:
        """``r_c`` (n_attr, d_ff): the relevance of every ``h_c = MLP(e_c)``."""
        return self.relevance(self.cond())

    def steering_term(self) -> mx.array:
        """``S r_c``: (d_ff,) or (B, d_ff) fp32; cached outside training."""
        state = self._steering
        key = (self.R, self.down.weight, state.strengths, *self.cond.arrays())
        if not self.training and _same(state.key, key):
            return state.term
        term = state.strengths.astype(mx.float32) @ self.attribute_relevance()
        if not self.training and _concrete(term):
            state.key, state.term = key, term
        return term

    def _inference_terms(self, dtype: mx.Dtype) -> tuple | None:
        """``(Rᵀ, g·A/sqrt(rank), g·S r_c or None)`` in ``dtype``, cached for decoding.

        Folding the gate, scale and casts in once leaves two small matmuls per token.
        None where values cannot be made concrete (inside ``mx.compile``).
        """
        strengths = self._steering.strengths
        term = None if strengths is None else self.steering_term()
        key = (self.R, self.down.weight, self.gate, term)
        fast = self._fast
        if _same(fast.key, key) and fast.terms[0].dtype == dtype:
            return fast.terms
        g = self.g
        terms = (
            self.R.T.astype(dtype),  # (d, rank)
            ((g / math.sqrt(self.rank)) * self.value_projection()).astype(dtype),
            None if term is None else (g * term).astype(dtype),  # (d_ff,)
        )
        if not _concrete(terms):
            return None
        fast.key, fast.terms = key, terms
        return terms

    def _delta(self, x: mx.array) -> mx.array:
        """``g·(r(x) + S r_c)`` for the down projection's input: (..., d_ff)."""
        strengths = self._steering.strengths
        if not self.training and (strengths is None or strengths.ndim == 1):
            terms = self._inference_terms(x.dtype)
            if terms is not None:
                Rt, Ag, bias = terms
                delta = (x @ Rt) @ Ag
                return delta if bias is None else delta + bias
        r = self.relevance(x)
        if strengths is not None:
            term = self.steering_term()  # (d_ff,) or (B, d_ff): constant over tokens
            if term.ndim == 2:
                if term.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"steering has {term.shape[0]} rows of strengths but the "
                        f"batch has {x.shape[0]} rows"
                    )
                term = term.reshape(term.shape[0], *(1,) * (x.ndim - 2), -1)
            r = r + term.astype(x.dtype)
        return self.g.astype(x.dtype) * r

    def __call__(self, x: mx.array, *args, **kwargs) -> Any:
        inject = getattr(self.ffn, self.down_name)
        inject.delta = self._delta(x)
        try:
            return self.ffn(x, *args, **kwargs)
        finally:
            inject.delta = None


# ---------------------------------------------------------------------------
# Finding FFNs in mlx-lm models


def _model_type(model: nn.Module) -> str:
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
            f"Model type '{_model_type(model)}' has no `layers`: "
            "not an mlx-lm language model mlx_braces can patch."
        )
    found = []
    for i, block in enumerate(layers):
        if _is_moe(block):
            raise ValueError(
                f"Model type '{_model_type(model)}' has mixture-of-experts FFNs "
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
                f"Model type '{_model_type(model)}': found {what} in block {i} "
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
    if braced_layers(model):
        raise ValueError("Model is already braced; load a fresh model to brace again.")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    ffns = find_ffns(model)
    n = len(ffns)
    if num_layers == -1:
        num_layers = n
    if not isinstance(num_layers, int) or not 1 <= num_layers <= n:
        raise ValueError(
            f"num_layers must be -1 (all) or in 1..{n} for this model, got {num_layers!r}"
        )
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
        parent, attr = _parent_and_attr(block, name)
        setattr(parent, attr, braced)
    return model


def _parent_and_attr(root: nn.Module, path: str) -> tuple[nn.Module, str]:
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
