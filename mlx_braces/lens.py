"""See what a brace does to a prompt: ``python -m mlx_braces.lens``.

A braced FFN computes ``W_V · (w(x) + g·r(x))``. Each column ``v_j`` of ``W_V`` (a
value vector) promotes the tokens that ``unembed(v_j)`` ranks highest (the logit
lens of Geva et al.), so the brace's change ``g·r_j(x)`` to the coefficient of
``v_j`` reads as "more (or less) of these tokens". For every braced layer this
module reports the gate ``g``, the relative change of the FFN output per token,
the value vectors the brace changed most, and the tokens each of them promotes.

"Changed most" ranks ``j`` by ``|g·r_j(x)| · ||v_j||``: the size of the change the
brace makes to the FFN output through ``v_j`` (averaged over the prompt's tokens,
or per token). The ratio ``|g·r_j| / |w_j|`` is shown next to it but not used to
rank, because it explodes for value vectors the base model barely uses.

The installed command is ``mlx_braces.inspect``; the module is ``lens`` so that no
module of the package shadows the standard library's ``inspect``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .braces import BracedFFN, braced_layers, linear_dims, model_type

FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")
FIGSIZE = (12.0, 6.0)  # inches: 1200 x 600 pixels (at plot.DPI)
RELATIVE_CHANGE = "||W_V·g·r(x)|| / ||W_V·w(x)||"


class InspectError(ValueError):
    """A model or request the inspector cannot handle."""


# ---------------------------------------------------------------------------
# The model's read-out: final norm and unembedding


def final_norm(model: nn.Module) -> nn.Module:
    """The norm mlx-lm's model applies to the residual stream after the last block."""
    inner = getattr(model, "model", None)
    for name in FINAL_NORMS:
        norm = getattr(inner, name, None) if inner is not None else None
        if isinstance(norm, nn.Module):
            return norm
    raise InspectError(
        f"Model type '{model_type(model)}': no final norm found (looked for "
        f"model.{{{', '.join(FINAL_NORMS)}}}); cannot read value vectors out."
    )


def unembed(model: nn.Module, h: mx.array) -> mx.array:
    """Logits for residual-stream states ``h`` (..., d) -> (..., vocab), as mlx-lm reads out.

    Follows mlx-lm's ``Model.__call__`` after the last block: final norm, then the
    ``lm_head`` (or GPT-NeoX's ``embed_out``, or the tied input embedding), then
    Gemma's soft-capping or Cohere's logit scale. Other architectures' monotone
    output transforms (e.g. Granite's divisor) are left out; they change no ranking.
    """
    h = final_norm(model)(h)
    inner = model.model
    if "lm_head" in model:
        logits = model.lm_head(h)
    elif "embed_out" in inner:
        logits = inner.embed_out(h)
    else:
        embed = next((inner[k] for k in ("embed_tokens", "wte") if k in inner), None)
        if embed is None:
            raise InspectError(
                f"Model type '{model_type(model)}': no lm_head or tied embedding "
                "found; cannot read value vectors out."
            )
        logits = embed.as_linear(h)
    cap = getattr(model, "final_logit_softcapping", None)
    if cap:
        logits = mx.tanh(logits / cap) * cap
    if model_type(model) in ("cohere", "cohere2"):
        logits = logits * inner.args.logit_scale
    return logits


# ---------------------------------------------------------------------------
# Value vectors (columns of W_V), read without dequantizing W_V whole


def _input_dtype(down: nn.Module) -> mx.Dtype:
    """The dtype to feed ``down``: its float weights' (or affine scales') dtype."""
    if isinstance(down, nn.QuantizedLinear):
        return down.scales.dtype if down.mode == "affine" else mx.float32
    return down.weight.dtype


def _weight_only(down: nn.Module, x: mx.array) -> mx.array:
    """``x W_Vᵀ`` without the layer's bias: (..., d_ff) -> (..., d)."""
    y = down(x)
    return y - down.bias if "bias" in down else y


def value_vectors(down: nn.Module, indices) -> mx.array:
    """Columns ``v_j`` of ``W_V`` for ``j`` in ``indices``: (|J|, d).

    One-hot rows through the down projection, so quantized weights go through the
    quantized kernel and only |J| rows of work are done.
    """
    d_ff, _ = linear_dims(down)
    idx = mx.array(np.asarray(indices, dtype=np.int32).reshape(-1))
    onehot = (idx[:, None] == mx.arange(d_ff)[None]).astype(_input_dtype(down))
    return _weight_only(down, onehot)


def value_norms(down: nn.Module, chunk: int = 512) -> mx.array:
    """``||v_j||`` for every column of ``W_V`` (d_ff,) fp32, ``chunk`` rows at a time."""
    d_ff, d = linear_dims(down)
    total = mx.zeros((d_ff,), dtype=mx.float32)
    for start in range(0, d, chunk):
        rows = slice(start, start + chunk)
        if isinstance(down, nn.QuantizedLinear):
            biases = down.get("biases")
            W = mx.dequantize(
                down.weight[rows],
                down.scales[rows],
                None if biases is None else biases[rows],
                group_size=down.group_size,
                bits=down.bits,
                mode=down.mode,
            )
        else:
            W = down.weight[rows]  # (rows, d_ff)
        total = total + mx.square(W.astype(mx.float32)).sum(axis=0)
        mx.eval(total)  # bound memory to one chunk
    return mx.sqrt(total)


def braced_blocks(model: nn.Module) -> list[tuple[int, str, BracedFFN]]:
    """``(block index, path inside the block, module)`` of every braced FFN."""
    found = []
    for i, block in enumerate(model.layers):
        for name, m in block.named_modules():
            if isinstance(m, BracedFFN):
                found.append((i, name, m))
    if not found:
        raise InspectError("Model has no braced layers: load it with a braces adapter.")
    return found


def _braced(model: nn.Module, layer: int | BracedFFN) -> BracedFFN:
    if isinstance(layer, BracedFFN):
        return layer
    blocks = {i: m for i, _, m in braced_blocks(model)}
    if layer not in blocks:
        raise InspectError(
            f"Layer {layer} is not braced; braced layers: {', '.join(map(str, blocks))}"
        )
    return blocks[layer]


def promoted_tokens(
    model: nn.Module, layer: int | BracedFFN, indices, k: int = 8, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` tokens each value vector ``v_j`` (j in ``indices``) of ``layer`` promotes most.

    Scores are ``unembed(v_j) - unembed(0)``: the read-out as mlx-lm applies it to
    ``v_j`` alone, less what it gives a zero vector (LayerNorm and head biases,
    shared by every vector). ``layer`` is a block index or a :class:`BracedFFN`.
    Returns token ids and scores, each (|J|, k), best first; ``chunk`` vectors are
    read out at a time to bound the (chunk, vocab) logits.
    """
    down = _braced(model, layer).down
    indices = np.asarray(indices).reshape(-1)
    ids, scores = [], []
    for start in range(0, len(indices), chunk):
        v = value_vectors(down, indices[start : start + chunk])  # (c, d)
        zero = mx.zeros((1, v.shape[-1]), dtype=v.dtype)
        logits = (unembed(model, v) - unembed(model, zero)).astype(mx.float32)
        kk = min(k, logits.shape[-1])
        top = mx.argpartition(-logits, kth=kk - 1, axis=-1)[:, :kk]  # (c, k) unsorted
        top_scores = mx.take_along_axis(logits, top, axis=-1)
        order = mx.argsort(-top_scores, axis=-1)
        ids.append(np.array(mx.take_along_axis(top, order, axis=-1)))
        scores.append(np.array(mx.take_along_axis(top_scores, order, axis=-1)))
    return np.concatenate(ids), np.concatenate(scores)


# ---------------------------------------------------------------------------
# Capturing w(x) and g·r(x)


def capture(model: nn.Module, tokens) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(w, g·r)`` of every braced layer for one forward of ``tokens``: each (T, d_ff) fp32.

    ``w`` is the base FFN's contribution weights (the down projection's input) and
    ``g·r`` what the brace adds to them (with any steering set on the model).
    """
    blocks = braced_blocks(model)
    moe = [str(i) for i, _, m in blocks if m.num_experts]
    if moe:
        raise InspectError(
            f"inspection reads dense FFNs; block(s) {', '.join(moe)} are "
            "mixture-of-experts (per-expert contributions are not inspected)"
        )
    injects = [getattr(m.ffn, m.down_name) for _, _, m in blocks]
    records = [[] for _ in injects]
    try:
        for inject, record in zip(injects, records):
            inject.record = record
        model(mx.array(np.asarray(tokens, dtype=np.int32))[None])
    finally:
        for inject in injects:
            inject.record = None
    pairs = []
    for record in records:
        if len(record) != 1:
            raise InspectError(f"expected one call per braced FFN, got {len(record)}")
        w, delta = record[0]
        if delta is None:
            delta = mx.zeros_like(w)
        pairs.append((w[0].astype(mx.float32), delta[0].astype(mx.float32)))
    mx.eval(pairs)
    return [(np.array(w), np.array(d)) for w, d in pairs]


def relative_change(down: nn.Module, w: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``||W_V δ_t|| / ||W_V w_t||`` per token (T,): the brace's share of the FFN output.

    Measured in the output space (d) rather than on the coefficients (d_ff), so the
    part of ``w`` that ``W_V`` maps to zero does not count.
    """
    out = _weight_only(down, mx.array(np.stack([w, delta])).astype(_input_dtype(down)))
    norms = np.array(mx.linalg.norm(out.astype(mx.float32), axis=-1))  # (2, T)
    return norms[1] / np.maximum(norms[0], 1e-12)


# ---------------------------------------------------------------------------
# The inspection


@dataclass
class Inspection:
    """What the braces did to one prompt (``per_token`` adds a T axis after L)."""

    tokens: np.ndarray  # (T,) prompt token ids
    token_text: list[str]  # (T,) how each token reads
    layers: list[int]  # (L,) block index of each braced layer
    paths: list[str]  # (L,) module path of each braced FFN
    gates: np.ndarray  # (L,) g = sigmoid(ĝ)
    relative_change: np.ndarray  # (L, T) ||W_V·g·r|| / ||W_V·w||
    indices: np.ndarray  # (L, [T,] N) value vectors j, most changed first
    change: np.ndarray  # (L, [T,] N) |g·r_j| · ||v_j|| (mean over tokens)
    relative: np.ndarray  # (L, [T,] N) |g·r_j| / |w_j| (sums over tokens)
    weight: np.ndarray  # (L, [T,] N) w_j (mean over tokens)
    delta: np.ndarray  # (L, [T,] N) g·r_j (mean over tokens), signed
    promoted: np.ndarray  # (L, [T,] N, K) token ids v_j promotes most
    promoted_scores: np.ndarray  # (L, [T,] N, K) their unembedding scores
    promoted_text: list = field(repr=False)  # nested like promoted: token strings
    per_token: bool = False
    steering: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (one entry per layer, then per vector)."""
        over = "per token" if self.per_token else "mean over tokens"

        def vectors(at) -> list[dict[str, Any]]:
            return [
                {
                    "index": int(self.indices[at][n]),
                    "change": float(self.change[at][n]),
                    "relative": float(self.relative[at][n]),
                    "weight": float(self.weight[at][n]),
                    "delta": float(self.delta[at][n]),
                    "promotes": [
                        {"id": int(t), "text": s, "score": float(c)}
                        for t, s, c in zip(
                            self.promoted[at][n],
                            _nested(self.promoted_text, at)[n],
                            self.promoted_scores[at][n],
                        )
                    ],
                }
                for n in range(self.indices[at].shape[-1])
            ]

        layers = []
        for i, (block, path) in enumerate(zip(self.layers, self.paths)):
            entry = {
                "layer": block,
                "path": path,
                "gate": float(self.gates[i]),
                "mean_relative_change": float(self.relative_change[i].mean()),
                "relative_change": [float(x) for x in self.relative_change[i]],
            }
            if self.per_token:
                entry["tokens"] = [
                    {"position": t, "vectors": vectors((i, t))}
                    for t in range(len(self.tokens))
                ]
            else:
                entry["vectors"] = vectors((i,))
            layers.append(entry)
        return {
            "tokens": [
                {"id": int(t), "text": s} for t, s in zip(self.tokens, self.token_text)
            ],
            "steering": self.steering,
            "per_token": self.per_token,
            "definitions": {
                "relative_change": RELATIVE_CHANGE,
                "change": f"|g·r_j|·||v_j|| ({over}); vectors are ranked by it",
                "relative": "sum|g·r_j| / sum|w_j| over tokens"
                if not self.per_token
                else "|g·r_j| / |w_j|",
                "weight": f"w_j ({over})",
                "delta": f"g·r_j ({over})",
                "score": "unembed(v_j) - unembed(0)",
            },
            "layers": layers,
        }


def _nested(rows: list, at: tuple[int, ...]) -> list:
    for i in at:
        rows = rows[i]
    return rows


def token_text(tokenizer: Any, ids) -> list[str]:
    """How each token id reads inside a text (keeps the leading space a lone decode drops)."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        one, two = tokenizer.decode([i]), tokenizer.decode([i, i])
        text = two[len(one) :] if two.startswith(one) and len(two) > len(one) else one
        if "\ufffd" in text:  # a byte of a multi-byte character: show the token
            text = tokenizer.convert_ids_to_tokens(i)
        out.append(text)
    return out


def _rank(w: np.ndarray, delta: np.ndarray, norms: np.ndarray, n: int, per_token: bool):
    """Top-``n`` value vectors by ``|δ_j|·||v_j||``; w, delta (T, d_ff), norms (d_ff,)."""
    eps = 1e-12
    if per_token:
        change = np.abs(delta) * norms  # (T, d_ff)
        top = np.argsort(-change, axis=-1, kind="stable")[:, :n]  # (T, N)

        def pick(a):
            return np.take_along_axis(a, top, axis=-1)

        rel = pick(np.abs(delta)) / (pick(np.abs(w)) + eps)
        return top, pick(change), rel, pick(w), pick(delta)
    change = np.abs(delta).mean(0) * norms  # (d_ff,)
    top = np.argsort(-change, kind="stable")[:n]
    rel = np.abs(delta[:, top]).sum(0) / (np.abs(w[:, top]).sum(0) + eps)
    return top, change[top], rel, w[:, top].mean(0), delta[:, top].mean(0)


def inspect_braces(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[int],
    top_vectors: int = 5,
    top_tokens: int = 8,
    per_token: bool = False,
    steering: dict[str, float] | None = None,
) -> Inspection:
    """Gates, per-token relative change and most-changed value vectors of every brace.

    ``prompt`` is text (encoded with ``tokenizer``) or token ids. ``steering``
    (``{attribute: strength}``) applies to this call only; without it, whatever
    steering is set on the model applies.
    """
    tokens = np.asarray(
        tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, dtype=np.int32
    )
    if tokens.ndim != 1 or tokens.size == 0:
        raise InspectError("prompt must be non-empty text or a flat list of token ids")
    if top_vectors < 1 or top_tokens < 1:
        raise InspectError("top_vectors and top_tokens must be at least 1")
    blocks = braced_blocks(model)
    if steering:
        from .steering import steering as steered

        with steered(model, steering):
            pairs = capture(model, tokens)
    else:
        pairs = capture(model, tokens)

    n = min(top_vectors, *(m.hidden_dims for _, _, m in blocks))
    ranked, rel_change, promoted, scores, texts = [], [], [], [], []
    for (_, _, braced), (w, delta) in zip(blocks, pairs):
        down = braced.down
        norms = np.array(value_norms(down))
        top = _rank(w, delta, norms, n, per_token)
        ranked.append(top)
        rel_change.append(relative_change(down, w, delta))
        # One read-out per distinct vector, then scattered back to the ranking's shape.
        unique, inverse = np.unique(top[0], return_inverse=True)
        ids, sc = promoted_tokens(model, braced, unique, top_tokens)
        inverse = inverse.reshape(top[0].shape)
        promoted.append(ids[inverse])
        scores.append(sc[inverse])
        words = np.array(token_text(tokenizer, ids), dtype=object)
        texts.append(words.reshape(ids.shape)[inverse].tolist())

    paths = {id(m): p for p, m in braced_layers(model)}

    def stack(i):
        return np.stack([r[i] for r in ranked])

    return Inspection(
        tokens=tokens,
        token_text=token_text(tokenizer, tokens),
        layers=[b for b, _, _ in blocks],
        paths=[paths[id(m)] for _, _, m in blocks],
        gates=np.array([m.g.item() for _, _, m in blocks], dtype=np.float32),
        relative_change=np.stack(rel_change),
        indices=stack(0),
        change=stack(1),
        relative=stack(2),
        weight=stack(3),
        delta=stack(4),
        promoted=np.stack(promoted),
        promoted_scores=np.stack(scores),
        promoted_text=texts,
        per_token=per_token,
        steering=dict(steering) if steering else None,
    )


# ---------------------------------------------------------------------------
# Output


def format_table(ins: Inspection) -> str:
    """A readable per-layer report of an :class:`Inspection`."""
    over = "per token" if ins.per_token else "mean over tokens"
    lines = [
        f"Prompt ({len(ins.tokens)} tokens): " + " ".join(map(repr, ins.token_text)),
        f"relative change = {RELATIVE_CHANGE}: the FFN output the brace adds, "
        "relative to the base FFN's",
        f"change = |g·r_j|·||v_j|| ({over}): how far the brace moves the FFN output "
        "through value vector v_j; vectors are ranked by it",
        f"rel = |g·r_j| / |w_j|; w = base coefficient w_j, Δw = g·r_j ({over}); "
        "Δw < 0 means the brace suppresses what v_j promotes",
    ]
    if ins.steering:
        lines.append(
            "steering: " + ", ".join(f"{a}={s:+g}" for a, s in ins.steering.items())
        )
    header = f"{'j':>7} {'change':>9} {'rel':>8} {'w':>9} {'Δw':>9}  promotes"

    def rows(at) -> list[str]:
        out = [header]
        for n in range(ins.indices[at].shape[-1]):
            words = " ".join(repr(s) for s in _nested(ins.promoted_text, at)[n])
            out.append(
                f"{ins.indices[at][n]:>7d} {ins.change[at][n]:>9.3g} "
                f"{ins.relative[at][n]:>8.3g} {ins.weight[at][n]:>+9.3g} "
                f"{ins.delta[at][n]:>+9.3g}  {words}"
            )
        return out

    for i, block in enumerate(ins.layers):
        lines += [
            "",
            f"layer {block} ({ins.paths[i]})  g = {ins.gates[i]:.4g}  "
            f"mean relative change = {ins.relative_change[i].mean():.3g}",
        ]
        if ins.per_token:
            for t, text in enumerate(ins.token_text):
                lines.append(
                    f"  token {t} {text!r}: relative change "
                    f"{ins.relative_change[i, t]:.3g}"
                )
                lines += ["  " + r for r in rows((i, t))]
        else:
            lines += rows((i,))
    return "\n".join(lines)


def _label(text: str) -> str:
    return repr(text)[1:-1].replace(" ", "␣")


def plot_inspection(ins: Inspection, file: str | Path | None):
    """Heatmap of the relative change (layer × token) beside the per-layer gates.

    Saves a 1200 x 600 PNG to ``file`` (if given) and returns the matplotlib Figure.
    """
    from .plot import finish, new_figure

    fig = new_figure(FIGSIZE, "plotting an inspection")
    heat_ax, gate_ax = fig.subplots(
        1, 2, gridspec_kw={"width_ratios": [5, 1]}, sharey=True
    )
    L, T = ins.relative_change.shape
    image = heat_ax.imshow(
        ins.relative_change, aspect="auto", cmap="viridis", interpolation="nearest"
    )
    fig.colorbar(image, ax=heat_ax, label=RELATIVE_CHANGE, location="left")
    step = max(1, -(-T // 60))  # at most ~60 token labels
    heat_ax.set_xticks(range(0, T, step))
    heat_ax.set_xticklabels(
        [_label(s) for s in ins.token_text[::step]], rotation=90, fontsize=8
    )
    heat_ax.set_yticks(range(L))
    heat_ax.set_yticklabels([str(b) for b in ins.layers])
    heat_ax.set(
        xlabel="token (␣ = space)",
        ylabel="layer",
        title="Relative change of FFN output",
    )
    gate_ax.barh(range(L), ins.gates, color="C1")
    gate_ax.set(xlabel="g = sigmoid(ĝ)", title="Gate")
    gate_ax.grid(axis="x", alpha=0.3)
    return finish(fig, file)


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_braces.inspect",
        description="Show what a braces adapter changes inside the model for a prompt.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Base model path or Hugging Face repo (default: the one the adapter records).",
    )
    parser.add_argument(
        "--adapter-path", required=True, help="Folder of the braces adapter."
    )
    parser.add_argument(
        "--prompt", required=True, help="Text to run through the model."
    )
    parser.add_argument(
        "--attribute",
        action="append",
        default=[],
        help="Steer by this attribute (repeatable; pairs with --strength in order).",
    )
    parser.add_argument(
        "--strength",
        action="append",
        type=float,
        default=[],
        help="Steering strength for the --attribute in the same position.",
    )
    parser.add_argument(
        "--top-vectors", type=int, default=5, help="Value vectors to show per layer."
    )
    parser.add_argument(
        "--top-tokens", type=int, default=8, help="Promoted tokens per value vector."
    )
    parser.add_argument(
        "--per-token", action="store_true", help="Rank value vectors for every token."
    )
    parser.add_argument("--json", action="store_true", help="Print JSON, not a table.")
    parser.add_argument(
        "--plot", default=None, help="Also draw a heatmap and gates to this PNG."
    )
    return parser


def steering_arg(attributes: list[str], strengths: list[float]) -> dict[str, float]:
    """Pair the ``--attribute`` and ``--strength`` flags in the order given."""
    if len(strengths) != len(attributes):
        raise InspectError(
            f"--attribute and --strength pair up in order: got {len(attributes)} "
            f"--attribute and {len(strengths)} --strength"
        )
    return dict(zip(attributes, strengths))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .adapters import AdapterError
    from .loading import load

    try:
        if args.plot:
            from .plot import require_matplotlib

            require_matplotlib("--plot")
        steering = steering_arg(args.attribute, args.strength)
        try:
            model, tokenizer = load(args.model, adapter_path=args.adapter_path)
        except AdapterError:
            raise
        except (OSError, ValueError) as e:  # a folder or Hub repo that cannot be read
            raise InspectError(f"cannot load the model: {e}") from None
        ins = inspect_braces(
            model,
            tokenizer,
            args.prompt,
            top_vectors=args.top_vectors,
            top_tokens=args.top_tokens,
            per_token=args.per_token,
            steering=steering or None,
        )
        if args.plot:
            try:
                plot_inspection(ins, args.plot)
            except OSError as e:
                raise InspectError(f"{args.plot}: cannot write ({e})") from None
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps(ins.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(format_table(ins))
    if args.plot:
        print(f"Wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
