"""Train a sentiment attribute on stories260K and print a steering strength sweep.

The embedded stories260K model (a 260K-parameter Llama trained on TinyStories) is
braced, given the shipped ``sentiment`` attributes (positive/negative word lists,
``mlx_braces/assets/attributes/sentiment.yaml``) and trained on the embedded SST-2
subset, whose lines carry ``"attribute": "positive" | "negative"``, mixed with
stories the base model writes itself, without a label (those train only the
unconditioned branch, pulling it back toward stories). The adapter is saved; then
the same prompt is continued at strengths -4 .. 4 of ``positive``, next to a
likelihood-ratio score on held-out SST-2: per-token log p(positive sentences) -
log p(negative sentences), which positive steering should raise.

stories260K is a toy and SST-2 is far from its stories: expect small effects and
odd text, even at strength 0. ``scripts/eval_steering.py`` measures such a sweep
with a learned sentiment classifier, against activation addition.

Usage::

    python examples/steer_sentiment.py [--adapter-path adapters_sentiment --iters 150]
    python -m mlx_braces.generate --adapter-path adapters_sentiment \\
        --attribute positive --strength 2 --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm import batch_generate, load
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.datasets import CacheDataset, TextDataset

from mlx_braces import (
    TrainingArgs,
    add_attributes,
    apply_braces,
    generate,
    print_trainable_parameters,
    steering,
    train,
)

ASSETS = Path(__file__).resolve().parent.parent / "mlx_braces" / "assets"
MODEL = ASSETS / "stories260K"
SST2 = ASSETS / "sst2"


def read(split: str, max_words: int) -> list[dict]:
    rows = [json.loads(line) for line in open(SST2 / f"{split}.jsonl")]
    return [r for r in rows if len(r["text"].split()) <= max_words]


def balanced(rows: list[dict], n: int = 100) -> list[dict]:
    pos = [r for r in rows if r["attribute"] == "positive"][:n]
    return pos + [r for r in rows if r["attribute"] == "negative"][:n]


def own_stories(model, tokenizer, n: int, max_tokens: int) -> list[dict]:
    """``n`` stories sampled from the base model (unlabelled text in its own domain)."""
    out = batch_generate(
        model,
        tokenizer,
        [[tokenizer.bos_token_id]] * n,
        max_tokens=max_tokens,
        sampler=make_sampler(temp=1.0),
        completion_batch_size=64,
    )
    return [{"text": t.strip()} for t in out.texts if t.strip()]


def sentiment_score(model, tokenizer, rows: list[dict]) -> float:
    """Mean per-token log p(positive sentences) - log p(negative sentences)."""

    def logprob(texts):
        toks = [
            [tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]
            for t in texts
        ]
        x = np.zeros((len(toks), max(map(len, toks))), np.int32)
        mask = np.zeros((len(toks), x.shape[1] - 1), np.float32)
        for i, t in enumerate(toks):
            x[i, : len(t)], mask[i, : len(t) - 1] = t, 1
        x, mask = mx.array(x), mx.array(mask)
        lp = -nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]) * mask
        return (lp.sum() / mask.sum()).item()

    pos = [r["text"] for r in rows if r["attribute"] == "positive"]
    neg = [r["text"] for r in rows if r["attribute"] == "negative"]
    return logprob(pos) - logprob(neg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter-path", default="adapters_sentiment")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-words", type=int, default=20, help="Shortest SST-2 only.")
    p.add_argument("--stories", type=int, default=200, help="Unlabelled own stories.")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    mx.random.seed(args.seed)
    model, tokenizer = load(str(MODEL))
    stories = own_stories(model, tokenizer, args.stories, 128)
    print(f"Sampled {len(stories)} unlabelled stories from the base model")
    apply_braces(model, rank=args.rank, seed=args.seed)
    add_attributes(model, tokenizer, "sentiment", seed=args.seed)  # positive, negative
    print_trainable_parameters(model)

    def dataset(split, extra=()):  # train() steers each row by its "attribute"
        rows = read(split, args.max_words) + list(extra)
        return CacheDataset(TextDataset(rows, tokenizer))

    train(
        model,
        optim.Adam(learning_rate=args.learning_rate),
        dataset("train", stories),
        dataset("valid"),
        TrainingArgs(
            batch_size=args.batch_size,
            iters=args.iters,
            val_batches=5,
            steps_per_report=25,
            steps_per_eval=args.iters,
            steps_per_save=args.iters,
            max_seq_length=256,
            adapter_file=str(Path(args.adapter_path) / "adapters.safetensors"),
            seed=args.seed,
            adapter_config={"model": str(MODEL)},
        ),
    )
    model.eval()
    print(f"Saved the adapter to {args.adapter_path}\n")

    held_out = balanced(read("test", args.max_words), 60)
    sampler = make_sampler(temp=0.7)
    print(
        f"score = per-token log p(positive) - log p(negative) of 60 + 60 held-out "
        f"SST-2 (dev) sentences; prompt {args.prompt!r}"
    )
    for s in (-4, -2, -1, 0, 1, 2, 4):
        with steering(model, {"positive": s}):
            score = sentiment_score(model, tokenizer, held_out)
            mx.random.seed(args.seed)
            text = generate(
                model,
                tokenizer,
                args.prompt,
                max_tokens=args.max_tokens,
                sampler=sampler,
            )
        print(f"positive {s:+d}  score {score:+.4f}  {text.strip()!r}")


if __name__ == "__main__":
    main()
