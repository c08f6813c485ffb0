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
# The gate logit ĝ at initialisation, g = sigmoid(-2) ≈ 0.12. The paper's −5
# (g ≈ 0.0067) leaves the brace all but closed for a short run: Adam moves ĝ by about
# the learning rate per step (METHOD.md §7, "Gate initialisation", measured).
DEFAULT_GATE_INIT = -2.0


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

    num_experts = 0  # a dense FFN (BracedMoE: its routed experts)

    def __init__(
        self,
        ffn: nn.Module,
        down_name: str,
        rank: int,
        gate_init: float = DEFAULT_GATE_INIT,
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
        # Steer-only attributes (steering.install_attributes): r(x) trains beside S r_c
        # (it absorbs the data's domain) and is dropped outside training, so the
        # layer is exactly the base FFN unsteered (METHOD.md §4, steer-only).
        self.steer_only = False

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

    def _delta(self, x: mx.array, cond: nn.Module | None) -> mx.array | None:
        """``g·(r(x) + S r_c)`` for the down projection's input: (..., d_ff). The train
        path of steer-only layers too: there ``r(x)`` takes up what the labelled data
        share (their domain), so ``S r_c`` learns only what tells the labels apart."""
        term = None if cond is None else cond.term(self, x)  # constant over tokens
        r = self.relevance(x)
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
            if self.steer_only:  # (S h_c) Rᵀ alone: r(x) dropped; unsteered the base
                z = None
                if offset is not None:
                    shape = (*x.shape[:-1], offset.shape[-1])
                    z = mx.broadcast_to(offset.astype(x.dtype), shape)
            elif offset is None:
                z = x @ Rt  # (..., rank)
            else:
                z = mx.addmm(offset.astype(x.dtype), x, Rt)  # R x + (S h_c) Rᵀ
            if z is None:
                pass
            elif output_side:
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
# Mixture-of-experts layers (METHOD.md §7, "Mixture-of-experts blocks")


def _switch_matmul(
    down: nn.Module,
    X: mx.array,
    indices: mx.array,
    sorted_indices: bool,
) -> mx.array:
    """``X W_V^e`` for each row's routed expert ``e``: (..., 1, d) -> (..., 1, d_ff).

    One gathered matmul with the experts' stored (E, d, d_ff) down weights, no
    transposition, so a quantized expert is never dequantized.
    """
    if "scales" in down:  # QuantizedSwitchLinear
        return mx.gather_qmm(
            X.astype(down.scales.dtype) if down.mode == "affine" else X,
            down["weight"],
            down["scales"],
            down.get("biases"),
            rhs_indices=indices,
            transpose=False,
            group_size=down.group_size,
            bits=down.bits,
            mode=down.mode,
            global_scale=down.get("global_scale"),
            sorted_indices=sorted_indices,
        )
    W = down["weight"]
    return mx.gather_mm(
        X.astype(W.dtype), W, rhs_indices=indices, sorted_indices=sorted_indices
    )


def expert_value_projection(down: nn.Module, R: mx.array) -> mx.array:
    """``A_e = R W_V^e`` of every expert: (rank, d) -> (E, rank, d_ff), no dequantizing."""
    E = switch_dims(down)[2]
    return _switch_matmul(down, R[None], mx.arange(E), False)


def _expert_layout(v: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
    """Per-token ``v`` (..., n) laid out as the experts' inputs are: (..., 1, 1, n),
    or (N·k, 1, n) in expert order when the switch sorted its tokens."""
    from ._compat import gather_sort  # the switch's own order

    v = mx.expand_dims(v, (-2, -3))
    return gather_sort(v, indices)[0] if sorted_indices else v


class _ExpertPending:
    """What the routed experts' down projection adds during one call."""

    __slots__ = ("u", "z", "scale", "A", "indices")

    def __init__(self):
        self.u: mx.array | None = None  # (..., d): Rᵀ(R x + o), per-row form
        self.scale: mx.array | None = None  # g/sqrt(rank): (1,) or (E,)
        self.z: mx.array | None = None  # (..., rank): R x + o, with A
        self.A: mx.array | None = None  # (E, rank, d_ff) fp32: g·A_e/sqrt(rank)
        self.indices: mx.array | None = None  # (..., k) as the router gave them


class _AddToExpertInput(nn.Module):
    """Stands in for the experts' down projection (a SwitchLinear): adds
    ``g·r_e(x)`` to each routed expert's input, then runs the layer."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.pending = _ExpertPending()

    def __call__(self, w: mx.array, indices: mx.array, sorted_indices=False):
        p = self.pending
        if p.u is not None:  # per row: W_V^eᵀ u for each routed expert
            u = _expert_layout(p.u, p.indices, sorted_indices)
            delta = _switch_matmul(self["linear"], u, indices, sorted_indices)
            scale = p.scale if p.scale.size == 1 else p.scale[indices][..., None, None]
            w = w + (scale * delta).astype(w.dtype)
        elif p.z is not None:  # z A_e for each routed expert (A of all e)
            # fp32: MLX's CPU gather_mm has no other dtype; A is small
            z = _expert_layout(p.z.astype(mx.float32), p.indices, sorted_indices)
            delta = mx.gather_mm(
                z, p.A, rhs_indices=indices, sorted_indices=sorted_indices
            )
            w = w + delta.astype(w.dtype)
        return self["linear"](w, indices, sorted_indices=sorted_indices)


class _RoutedPlan:
    """How the routed experts' brace is computed in one call (set by the owner)."""

    __slots__ = ("R", "Rt", "offset", "scale", "A", "expert_A", "rows_for_A")

    def __init__(self):
        self.R: mx.array | None = None  # (rank, d): train path
        self.Rt: mx.array | None = None  # (d, rank): inference path
        self.offset: mx.array | None = None  # (S h_c) Rᵀ: (rank,) or (B, 1.., rank)
        self.scale: mx.array | None = None
        self.A: mx.array | None = None  # inference: the cached g·A/sqrt(rank)
        self.expert_A: Callable[[], mx.array] | None = None  # train: computes it
        self.rows_for_A = 0  # train: routed rows above which A beats per-row


class _Routed(nn.Module):
    """Stands in for the routed-experts module (``SwitchGLU``/``SwitchMLP``): takes
    its input ``x`` and the router's top-k ``indices`` and hands the experts' down
    projection ``R x`` (plus the steering offset) for the call. ``record``, when a
    list, receives ``(x, indices)`` of every call (the routing, for inspection)."""

    def __init__(self, switch: nn.Module, down_name: str):
        super().__init__()
        self.switch = switch
        self.down_name = down_name
        self.plan = _RoutedPlan()
        self.record = None

    def __call__(self, x: mx.array, indices: mx.array, *args, **kwargs):
        switch, plan = self["switch"], self.plan
        if self.record is not None:
            self.record.append((x, indices))
        pending = switch[self.down_name].pending
        if plan.R is not None:
            R = plan.R.astype(x.dtype)
            z = x @ R.T
            if plan.offset is not None:
                z = z + plan.offset.astype(x.dtype)
            if indices.size > plan.rows_for_A:  # fewer multiply-adds: A of every e
                pending.z, pending.A = z, plan.expert_A()
            else:  # W_V^eᵀ (Rᵀ z) per routed row
                pending.u, pending.scale = z @ R, plan.scale
        elif plan.Rt is not None:
            if plan.offset is None:
                pending.z = x @ plan.Rt
            else:
                pending.z = mx.addmm(plan.offset.astype(x.dtype), x, plan.Rt)
            pending.A = plan.A
        pending.indices = mx.stop_gradient(indices)
        try:
            return switch(x, indices, *args, **kwargs)
        finally:
            pending.u = pending.z = pending.scale = pending.A = None
            pending.indices = None


class _Sites:
    """The wrapped modules of a braced MoE block (a plain object: not in the tree)."""

    __slots__ = ("routed", "shared")

    def __init__(self, routed: _Routed, shared: list[_AddToInput]):
        self.routed = routed
        self.shared = shared


class BracedMoE(BracedFFN):
    """A braced mixture-of-experts block: one ``R`` and one gate for all its experts.

    Each routed expert ``e`` gets ``g·r_e(x)``, ``r_e(x) = (R W_V^e)ᵀ (R x)/sqrt(rank)``
    with its own ``W_V^e``, added to its down projection's input; a dense (shared)
    expert beside them is braced as a dense FFN with the same ``R`` and gate. The
    router and the experts' code run unchanged (``ffn`` is the whole MoE block).

    Train mode computes ``W_V^eᵀ (Rᵀ (R x))`` per token and routed expert with one
    gathered (quantized) matmul, or, with more than ``E·rank`` routed rows (fewer
    multiply-adds), ``A_e = R W_V^e`` of every expert, (E, rank, d_ff), and gathers
    the routed rows of ``A``; inference caches that ``A``. Both are exact. ``gate``
    is (1,), or (E,) for the per-expert-gate variant METHOD.md measures (routed
    experts only).
    """

    def __init__(
        self,
        ffn: nn.Module,
        rank: int,
        gate_init: float = DEFAULT_GATE_INIT,
        key: mx.array | None = None,
    ):
        nn.Module.__init__(self)
        switch_path, down_name, shared = moe_parts(ffn)
        parent, attr = parent_and_attr(ffn, switch_path)
        switch = getattr(parent, attr)
        d_ff, d, E = switch_dims(getattr(switch, down_name))
        if not 0 < rank <= d:
            raise ValueError(f"rank must be in 1..{d} (the model width), got {rank}")
        ffn.freeze()
        setattr(switch, down_name, _AddToExpertInput(getattr(switch, down_name)))
        routed = _Routed(switch, down_name)
        setattr(parent, attr, routed)
        injects = []
        for path, dn in shared:
            owner, name = parent_and_attr(ffn, path)
            site = getattr(owner, name)
            injects.append(_AddToInput(getattr(site, dn)))
            setattr(site, dn, injects[-1])
        self.ffn = ffn
        self.down_name = f"{switch_path}.switch.{down_name}"  # _AddToExpertInput
        self.shared_paths = tuple(f"{p}.{dn}" for p, dn in shared)
        self.rank = rank
        self.gate_init = gate_init
        self.dims = d
        self.hidden_dims = d_ff
        self.num_experts = E
        self.R = orthonormal_rows(rank, d, key)
        self.gate = mx.array([gate_init], dtype=mx.float32)
        self._memo = _Memo()
        self._sites = _Sites(routed, injects)

    @property
    def down(self) -> nn.Module:
        """The frozen base experts' down projection (a SwitchLinear: every ``W_V^e``)."""
        return self._sites.routed["switch"][self._sites.routed.down_name].linear

    def value_projection(self) -> mx.array:
        """``A_e = R W_V^e`` (E, rank, d_ff); cached outside training."""
        down, R = self.down, self.R
        key = (R, *_weight_arrays(down))
        return self.cached("A", key, lambda: expert_value_projection(down, R))

    def relevance(self, x: mx.array) -> mx.array:
        """``r_e(x)`` of every expert: (..., d) -> (..., E, d_ff)."""
        z = x @ self.R.astype(x.dtype).T  # (..., rank)
        A = self.value_projection().astype(x.dtype)  # (E, rank, d_ff)
        r = mx.expand_dims(z, (-2, -3)) @ A  # (..., E, 1, d_ff)
        return r.squeeze(-2) * (1.0 / math.sqrt(self.rank))

    def _scaled_A(self) -> mx.array:
        """``g_e·A_e/sqrt(rank)`` (E, rank, d_ff) fp32."""
        scale = mx.sigmoid(self["gate"]) * (1.0 / math.sqrt(self.rank))
        return scale.reshape(-1, 1, 1) * self.value_projection().astype(mx.float32)

    def _routed_A(self) -> mx.array:
        """:meth:`_scaled_A`, kept in the memo (inference only)."""
        key = (self["R"], self["gate"], *_weight_arrays(self.down))
        return self._memo.get("routed", key, self._scaled_A)

    def _shared_terms(self, j: int, inject: _AddToInput, dtype: mx.Dtype):
        """``(Rᵀ, Bᵀ)`` of shared expert ``j`` (as a dense FFN's), cached."""
        R, gate, down = self["R"], self["gate"], inject["linear"]

        def compute() -> tuple[mx.array, mx.array]:
            B = output_projection(down, value_projection(down, R))  # (rank, d)
            scale = mx.sigmoid(gate) * (1.0 / math.sqrt(self.rank))
            return R.T.astype(dtype), (scale * B.astype(mx.float32)).astype(dtype)

        return self._memo.get(
            ("shared", j, dtype), (R, gate, *_weight_arrays(down)), compute
        )

    def __call__(self, x: mx.array, *args, **kwargs) -> Any:
        sites, cond = self._sites, self.get("cond")
        plan = sites.routed.plan
        offset = None if cond is None else cond.offset(self, x)  # (S h_c) Rᵀ
        if self.gate.size != 1 and sites.shared:
            raise ValueError(
                "per-expert gates brace routed experts only; this block has shared "
                f"experts ({', '.join(self.shared_paths)})"
            )
        if self.training:
            R = self.R
            plan.R, plan.offset = R, offset
            plan.scale = self.g * (1.0 / math.sqrt(self.rank))
            # A of all E experts costs E·rank rows of W_V^eᵀ: the cheaper form wins
            plan.expert_A, plan.rows_for_A = (
                self._scaled_A,
                self.num_experts * self.rank,
            )
            if sites.shared:
                z = x @ R.astype(x.dtype).T
                if offset is not None:
                    z = z + offset.astype(x.dtype)
                g = self.g.astype(x.dtype) * (1.0 / math.sqrt(self.rank))
                for inject in sites.shared:
                    A = value_projection(inject["linear"], R).astype(x.dtype)
                    inject.pending.delta = g * (z @ A)
        else:
            plan.A, plan.offset = self._routed_A(), offset
            plan.Rt = self["R"].T.astype(x.dtype)
            for j, inject in enumerate(sites.shared):
                Rt, Bt = self._shared_terms(j, inject, x.dtype)
                if offset is None:
                    z = x @ Rt
                else:
                    z = mx.addmm(offset.astype(x.dtype), x, Rt)
                inject.pending.branch = (z, Bt)
        try:
            return self["ffn"](x, *args, **kwargs)
        finally:
            plan.R = plan.Rt = plan.offset = plan.scale = plan.A = None
            plan.expert_A = None
            for inject in sites.shared:
                inject.pending.delta = inject.pending.branch = None


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


def _switch_types() -> tuple[type, ...]:
    """mlx-lm's expert linear layers (a named reach into ``switch_layers``)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return SwitchLinear, QuantizedSwitchLinear


def _is_moe(module: nn.Module) -> bool:
    types = _switch_types()
    return any(isinstance(m, types) for _, m in module.named_modules())


def switch_dims(layer: nn.Module) -> tuple[int, int, int]:
    """(input_dims, output_dims, num_experts) of a (quantized) SwitchLinear."""
    return layer.input_dims, layer.output_dims, layer.num_experts


def _pick_down(dims: dict[str, tuple[int, int]]) -> str | None:
    """The one d_ff -> d projection among ``dims`` (name: (in, out)), else None."""
    if not 2 <= len(dims) <= 3:  # q/k/v/o attention (e.g. Gemma-7B's 3072->4096) has 4
        return None
    hits = []
    for name, (d_ff, d) in dims.items():
        others = [v for k, v in dims.items() if k != name]
        if d_ff != d and all(i == d and o in (d_ff, 2 * d_ff) for i, o in others):
            hits.append(name)
    # A non-gated FFN (fc, proj) passes both ways round: the down one contracts.
    hits = [h for h in hits if len(hits) == 1 or dims[h][0] > dims[h][1]]
    return hits[0] if len(hits) == 1 else None


def find_down_projection(module: nn.Module) -> str | None:
    """Name of ``module``'s down projection if ``module`` looks like an FFN, else None.

    An FFN has linear children d -> (d_ff or 2·d_ff) (up/gate/fc, or fused gate_up)
    and exactly one d_ff -> d (down), with d_ff != d. Attention blocks fail this test.
    """
    lins = {k: v for k, v in module.children().items() if isinstance(v, LINEAR_TYPES)}
    return _pick_down({k: linear_dims(v) for k, v in lins.items()})


def find_switch_down(module: nn.Module) -> str | None:
    """Name of the experts' down projection if ``module`` is a routed-experts FFN
    (mlx-lm's ``SwitchGLU``/``SwitchMLP``: the same test on SwitchLinear children)."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    types = _switch_types()
    lins = {k: v for k, v in module.children().items() if isinstance(v, types)}
    for cls, name in ((SwitchGLU, "down_proj"), (SwitchMLP, "fc2")):
        if isinstance(module, cls) and name in lins:  # gpt-oss has d_ff == d
            return name
    return _pick_down({k: switch_dims(v)[:2] for k, v in lins.items()})


def _dense_hits(module: nn.Module, skip: str | None = None) -> list:
    """``(path, module, down name)`` of every dense FFN under ``module`` (not ``skip``)."""
    return [
        (name, m, down)
        for name, m in module.named_modules()
        if name
        and not (skip and (name == skip or name.startswith(skip + ".")))
        and (down := find_down_projection(m)) is not None
    ]


def moe_parts(moe: nn.Module) -> tuple[str, str, list[tuple[str, str]]]:
    """``(switch path, its down name, [(shared FFN path, its down name)])`` of an
    MoE block: the routed experts, and the dense (shared) experts beside them."""
    switches = [
        (name, down)
        for name, m in moe.named_modules()
        if name and (down := find_switch_down(m)) is not None
    ]
    if len(switches) != 1:
        raise ValueError(f"expected one routed-experts module, found {len(switches)}")
    path, down = switches[0]
    return path, down, [(p, d) for p, _, d in _dense_hits(moe, skip=path)]


def _moe_block(block: nn.Module, i: int, mt: str) -> tuple[str, nn.Module, str]:
    """``(path, MoE block, routed down path)`` of a block with routed experts."""
    switches = [
        name
        for name, m in block.named_modules()
        if name and find_switch_down(m) is not None
    ]
    if len(switches) != 1 or "." not in switches[0]:
        raise ValueError(
            f"Model type '{mt}': block {i} ({type(block).__name__}) has "
            f"mixture-of-experts layers but {len(switches)} routed-experts modules "
            "inside a router block; expected one SwitchGLU/SwitchMLP-like module "
            "(gate/up -> down expert projections) inside the FFN block."
        )
    path, switch = switches[0].rsplit(".", 1)
    parent, attr = parent_and_attr(block, path)
    moe = getattr(parent, attr)
    outside = _dense_hits(block, skip=path)
    if outside:
        raise ValueError(
            f"Model type '{mt}': block {i} has a dense FFN ({outside[0][0]}) beside "
            f"its mixture-of-experts block ({path}); expected one FFN per block."
        )
    return path, moe, f"{switch}.{find_switch_down(getattr(moe, switch))}"


def find_ffns(
    model: nn.Module, moe: bool = False
) -> list[tuple[int, str, nn.Module, str]]:
    """``(block index, attribute, ffn module, down name)`` for every transformer block.

    With ``moe``, a block with routed experts gives its MoE block (router, experts
    and any shared experts) and the dotted path of the experts' down projection;
    without it such a model is refused (a method for dense FFNs only).
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(
            f"Model type '{model_type(model)}' has no `layers`: "
            "not an mlx-lm language model mlx_braces can patch."
        )
    found = []
    for i, block in enumerate(layers):
        if _is_moe(block):
            if not moe:
                raise ValueError(
                    f"Model type '{model_type(model)}' has mixture-of-experts FFNs "
                    f"(block {i}); this needs dense FFNs (apply_braces supports MoE)."
                )
            found.append((i, *_moe_block(block, i, model_type(model))))
            continue
        hits = _dense_hits(block)
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
    gate_init: float = DEFAULT_GATE_INIT,
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
    ffns = find_ffns(model, moe=True)
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
        parent, attr = parent_and_attr(ffn, down)
        layer = getattr(parent, attr)
        d = switch_dims(layer)[1] if "." in down else linear_dims(layer)[1]
        if rank > d:
            raise ValueError(
                f"rank must be at most the model width d={d}, got rank={rank}"
            )
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), n) if seed is not None else [None] * n
    for i, name, ffn, down in ffns[n - num_layers :]:
        block = model.layers[i]
        if "." in down:  # routed experts: find_ffns gave their down's path
            braced = BracedMoE(ffn, rank, gate_init, key=keys[i])
        else:
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
