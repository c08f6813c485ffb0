"""Quality benchmark: braces against LoRA, DoRA and an IA³-style scale, on real data.

Every method fine-tunes the real stories260K checkpoint with the same loop
(``mlx_lm.tuner.trainer.train``, plus the braces retraction after each update: a no-op
for the others), the same data, data order, seeds, iterations, batch size, optimizer
(Adam) and learning-rate grid, and the loss scores the answer tokens only. Per
method the rate is picked on the validation split with the first seed, by the mean
log-likelihood of the right answers (the validation loss: accuracy near chance cannot
rank rates; a run whose loss went non-finite is never picked). Every seed is then
trained at that rate and scored on the test split by the log-likelihood of the
answer options (``mlx_braces.evaluate.multiple_choice``).
"Matched budget" compares all methods at the braces' rank; "matched parameters"
compares braces-r8 with lora-qv-r2 (about the same count) and ia3.

Tasks:
  sst2   train on the embedded SST-2 train subset ("Review: <text>\\nSentiment:" ->
         " positive"/" negative"), pick on its 200 held-out train sentences, test on
         the full SST-2 dev split (872).
  boolq  LLM-Adapters BoolQ (Alpaca prompt -> "the correct answer is true|false"),
         read from --assets: a shuffled train subset (--train-size, 1000), the
         next train items to pick on (--valid-size, 200), the first --boolq-test
         test items.

Methods (``--methods``): braces-rN (rank N on every FFN), lora-qv-rN / dora-qv-rN
(mlx-lm LoRA/DoRA of rank N on q_proj and v_proj, the paper's peer), lora-all-rN
(mlx-lm's default keys: every linear layer), ia3 (a learned per-channel scale of the
down projection's input, initialised to 1).

    python scripts/bench_quality.py                  # sst2
    python scripts/bench_quality.py --tasks boolq    # slower: ~200-token prompts
    python scripts/bench_quality.py --methods braces-r8 lora-qv-r8 --seeds 0 --lrs 1e-2

Prints one table and writes JSON (--output). Times are noisy on a shared machine;
compare methods within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm import load
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.trainer import train as mlx_train
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_braces.braces import (
    apply_braces,
    find_ffns,
    orthonormality_error,
    orthonormalize,
    trainable_parameter_count,
)
from mlx_braces.evaluate import (
    encode_pair,
    make_prompt,
    multiple_choice,
    response_prefix,
)
from mlx_braces.models import EMBEDDED_DATA, EMBEDDED_MODEL

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
BOOLQ = Path("AGI-Edgerunners__LLM-Adapters") / "dataset" / "boolq"
PEER = "lora-qv-r8"  # the paper's baseline: LoRA on q and v at the braces' rank
DEFAULT_METHODS = [
    "braces-r8",
    "lora-qv-r8",
    "lora-all-r8",
    "dora-qv-r8",
    "lora-qv-r2",
    "ia3",
]
_METHOD = re.compile(r"^(braces|lora-qv|dora-qv|lora-all)-r(\d+)$|^ia3$")


# ---------------------------------------------------------------------------
# Methods


class ScaledInput(nn.Module):
    """IA³-style: ``linear(x * scale)`` with a learned (d_ff,) scale, initialised to 1."""

    def __init__(self, linear: nn.Module, dims: int):
        super().__init__()
        self.linear = linear
        self.scale = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x * self.scale.astype(x.dtype))


def apply_ia3(model: nn.Module) -> None:
    """Scale the input of every FFN's down projection (d_ff parameters per layer)."""
    model.freeze()
    for _, _, ffn, down in find_ffns(model):
        linear = getattr(ffn, down)
        setattr(ffn, down, ScaledInput(linear, linear.weight.shape[1]))


def apply_method(model: nn.Module, method: str, seed: int) -> None:
    """Freeze ``model`` and add ``method``'s trainable parameters (drawn from ``seed``)."""
    m = _METHOD.match(method)
    if m is None:
        raise ValueError(f"unknown method {method!r}")
    mx.random.seed(seed)
    kind, rank = m.group(1), int(m.group(2) or 0)
    if method == "ia3":
        apply_ia3(model)
    elif kind == "braces":
        apply_braces(model, rank=rank, seed=seed)
    else:
        model.freeze()
        keys = None if kind == "lora-all" else ["self_attn.q_proj", "self_attn.v_proj"]
        config = {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": keys}
        linear_to_lora_layers(
            model, len(model.layers), config, use_dora=kind == "dora-qv"
        )


def answer_loss(model, batch, lengths):
    """mlx-lm's ``default_loss`` without the padding target after each sequence.

    mlx-lm 0.32's mask (``steps <= length``) also scores the pad id after the last
    token (ml-explore/mlx-lm PR #1697); with one-word answers that pad target
    (about 24 nats on stories260K) would dominate the loss.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = (steps >= lengths[:, 0:1]) & (steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


class AfterStep(TrainingCallback):
    """Retracts braces' R after every update (mlx-lm reports every step here)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.losses = []

    def on_train_loss_report(self, train_info: dict):
        orthonormalize(self.model)  # a no-op without braces
        self.losses.append(train_info["train_loss"])


# ---------------------------------------------------------------------------
# Data: training pairs and multiple-choice splits


def _mc(contexts: list[str], golds: list[int], options: list[str]) -> dict:
    """A multiple-choice split: every context has the same answer options."""
    return {"contexts": contexts, "choices": [options] * len(contexts), "golds": golds}


def _pairs(tokenizer, contexts, targets) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) per example: mlx-lm's loss then scores the target only."""
    out = []
    for c, t in zip(contexts, targets):
        ctx, cont = encode_pair(tokenizer, c, t)
        out.append((ctx + cont, len(ctx)))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sst2(tokenizer, args) -> dict:
    """Embedded SST-2: train subset, held-out train sentences, the full dev split."""
    labels = [" negative", " positive"]

    def split(name, n=None):
        rows = _read_jsonl(EMBEDDED_DATA / f"{name}.jsonl")[:n]
        return [f"Review: {r['text']}\nSentiment:" for r in rows], [
            r["label"] for r in rows
        ]

    ctx, y = split("train", args.train_size)
    return {
        "train": _pairs(tokenizer, ctx, [labels[i] for i in y]),
        "valid": _mc(*split("valid", args.valid_size), labels),
        "test": _mc(*split("test"), labels),
    }


def boolq(tokenizer, args) -> dict:
    """LLM-Adapters BoolQ: a shuffled train subset, the next items to pick on, a test prefix."""
    folder = Path(args.assets) / BOOLQ
    for f in ("train.json", "test.json"):
        if not (folder / f).is_file():
            sys.exit(f"Error: {folder / f} not found (set --assets)")
    with open(folder / "train.json") as f:
        train = json.load(f)
    with open(folder / "test.json") as f:
        test = json.load(f)
    random.Random(0).shuffle(train)
    n = args.train_size or 1000
    options = ["true", "false"]

    def mc(items):
        return _mc(
            [make_prompt(it) + response_prefix(it) for it in items],
            [options.index(it["answer"]) for it in items],
            options,
        )

    return {
        "train": _pairs(
            tokenizer,
            [make_prompt(it) for it in train[:n]],
            [it["output"] for it in train[:n]],
        ),
        "valid": mc(train[n : n + (args.valid_size or 200)]),
        "test": mc(test[: args.boolq_test]),
    }


TASKS = {"sst2": sst2, "boolq": boolq}


# ---------------------------------------------------------------------------
# One run


def accuracy(model, tokenizer, split: dict, batch_size: int) -> tuple[float, float]:
    """Accuracy and the mean log-likelihood of the right answers."""
    model.eval()
    r = multiple_choice(
        model,
        tokenizer,
        split["contexts"],
        split["choices"],
        split["golds"],
        batch_size,
    )
    gold = [ll[g] for ll, g in zip(r["loglikelihoods"], split["golds"])]
    return r["acc"], float(np.mean(gold))


def train_run(method: str, data: dict, lr: float, seed: int, args) -> tuple:
    """Fine-tune a fresh model with ``method``; returns (model, stats)."""
    model, _ = load(str(args.model))
    apply_method(model, method, seed)
    params = trainable_parameter_count(model)
    np.random.seed(seed)  # mlx-lm's batch order
    mx.random.seed(seed)
    targs = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        steps_per_report=1,  # the callback (retraction) runs after every update
        steps_per_eval=args.iters + 1,
        steps_per_save=args.iters + 1,
        max_seq_length=args.max_seq_length,
    )
    with tempfile.TemporaryDirectory() as tmp:
        targs.adapter_file = os.path.join(tmp, "adapters.safetensors")
        callback = AfterStep(model)
        mx.reset_peak_memory()
        tic = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_train(
                model,
                optim.Adam(learning_rate=lr),
                data["train"],
                None,
                targs,
                loss=answer_loss,
                training_callback=callback,
            )
        mx.eval(model.parameters())
        seconds = time.perf_counter() - tic
    stats = {
        "trainable_parameters": params,
        "train_seconds": seconds,
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "final_train_loss": float(np.mean(callback.losses[-10:])),
        "orthonormality_error": orthonormality_error(model),
    }
    return model, stats


def run_task(task: str, args) -> dict:
    """Learning-rate pick, then every seed, for every method, on one task."""
    base, tokenizer = load(str(args.model))
    data = TASKS[task](tokenizer, args)
    golds = np.array(data["test"]["golds"])
    out = {
        "n_train": len(data["train"]),
        "n_valid": len(data["valid"]["golds"]),
        "n_test": len(golds),
        "majority_acc": float(max(golds.mean(), 1 - golds.mean())),
        "base_acc": accuracy(base, tokenizer, data["test"], args.eval_batch_size)[0],
        "methods": {},
    }
    print(
        f"[{task}] train {out['n_train']}, valid {out['n_valid']}, test {out['n_test']}; "
        f"untrained {out['base_acc']:.4f}, majority {out['majority_acc']:.4f}",
        flush=True,
    )
    for method in args.methods:
        grid = {}
        for lr in args.lrs:
            model, stats = train_run(method, data, lr, args.seeds[0], args)
            acc, gold_ll = accuracy(
                model, tokenizer, data["valid"], args.eval_batch_size
            )
            if not math.isfinite(stats["final_train_loss"]):
                gold_ll = -math.inf  # diverged: never picked
            grid[lr] = ((gold_ll, acc), model, stats)
            print(
                f"  {method:<12} lr {lr:<7g} valid {acc:.4f} (gold ll {gold_ll:.3f})",
                flush=True,
            )
        lr = max(args.lrs, key=lambda r: grid[r][0])  # lowest validation loss
        runs = []
        for seed in args.seeds:
            if seed == args.seeds[0]:
                _, model, stats = grid[lr]
            else:
                model, stats = train_run(method, data, lr, seed, args)
            acc, _ = accuracy(model, tokenizer, data["test"], args.eval_batch_size)
            runs.append({"seed": seed, "test_acc": acc, **stats})
            print(
                f"  {method:<12} lr {lr:<7g} seed {seed} test {acc:.4f} "
                f"({stats['train_seconds']:.1f}s)",
                flush=True,
            )
        valid = {
            str(r): {"gold_ll": grid[r][0][0], "acc": grid[r][0][1]} for r in args.lrs
        }
        grid.clear()
        accs = [r["test_acc"] for r in runs]
        out["methods"][method] = {
            "lr": lr,
            "valid_by_lr": valid,
            "test_acc_mean": float(np.mean(accs)),
            "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "trainable_parameters": runs[0]["trainable_parameters"],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])),
            "peak_memory_mb_max": float(max(r["peak_memory_mb"] for r in runs)),
            "runs": runs,
        }
    return out


# ---------------------------------------------------------------------------
# Report


def table(task: str, r: dict) -> str:
    """One markdown table: accuracy mean ± std, parameters, time, memory, vs the peer."""
    peer = r["methods"].get(PEER)
    head = (
        f"| {task} method | lr | test acc (mean ± std) | trainable params |"
        " train s | peak MB |"
    )
    rows = [head, "|" + "---|" * 6]
    if peer:
        rows[0] += f" params / {PEER} | time / {PEER} | acc − {PEER} |"
        rows[1] += "---|---|---|"
    for name, m in r["methods"].items():
        row = (
            f"| {name} | {m['lr']:g} | {100 * m['test_acc_mean']:.2f} ± "
            f"{100 * m['test_acc_std']:.2f} | {m['trainable_parameters']:,} | "
            f"{m['train_seconds_mean']:.1f} | {m['peak_memory_mb_max']:.1f} |"
        )
        if peer:
            ratio = m["trainable_parameters"] / peer["trainable_parameters"]
            time_ratio = m["train_seconds_mean"] / peer["train_seconds_mean"]
            diff = 100 * (m["test_acc_mean"] - peer["test_acc_mean"])
            row += f" {ratio:.2f} | {time_ratio:.2f} | {diff:+.2f} |"
        rows.append(row)
    rows.append(
        f"\nuntrained model {100 * r['base_acc']:.2f}, majority class "
        f"{100 * r['majority_acc']:.2f} (test n={r['n_test']}, train n={r['n_train']})"
    )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2"], choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--train-size", type=int, help="First N training examples")
    p.add_argument("--valid-size", type=int, help="Validation items (default 200)")
    p.add_argument("--boolq-test", type=int, default=500, help="BoolQ test items")
    p.add_argument("--model", default=str(EMBEDDED_MODEL))
    p.add_argument("--assets", default=str(ASSETS), help="Shared assets folder")
    p.add_argument("--output", default="bench_quality.json")
    return p


def main() -> None:
    args = build_parser().parse_args()
    for m in args.methods:
        if not _METHOD.match(m):
            sys.exit(f"Error: unknown method {m!r} (e.g. braces-r8, lora-qv-r8, ia3)")
    tic = time.perf_counter()
    results = {"command": " ".join(sys.argv), "settings": vars(args), "tasks": {}}
    for task in args.tasks:
        results["tasks"][task] = run_task(task, args)
    results["wall_seconds"] = time.perf_counter() - tic
    for task, r in results["tasks"].items():
        print("\n" + table(task, r))
    print(f"\nwall time {results['wall_seconds']:.0f}s")
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
