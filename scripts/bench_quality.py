"""Quality benchmark: braces against LoRA, DoRA, IA³ and LoReFT on a real model.

Every method fine-tunes the same base (default SmolLM2-135M-Instruct, dequantized to
float32 on a CPU) with the same loop: Adam at a constant rate, the same data order
per seed, the same iterations and batch size, and a loss on the answer tokens only.
The protocol, per task and method:

1. a learning-rate grid (the method's own, ``--lrs`` to override), trained with the
   first seed and scored on the validation split by the answer-restricted
   log-likelihood (the cross-entropy of the right option among the options: smooth,
   unlike the accuracy of 100 items). A pick at an edge of the grid extends the grid
   one step past that edge (``--max-extend`` times), so the rate is never an edge
   by construction unless the extension ran out (then the JSON says ``at_edge``);
2. every seed (``--seeds``, default 3) trained at the picked rate and scored on the
   test split; reported as mean ± std (ddof 1) with trainable parameters, training
   tokens/s and peak memory.

Tasks (``--tasks``):
  sst2         the embedded SST-2 train subset ("Review: <text>\\nSentiment:" ->
               " positive"/" negative"), validation on its held-out train sentences,
               test on the full SST-2 dev split (872).
  commonsense  LLM-Adapters' prompt format and answers ("the correct answer is
               answer2"); one model trained on the union of the ``--cs-tasks``
               train splits (the paper's protocol; default ARC-Easy, ARC-Challenge
               and OpenBookQA, ``--full`` adds BoolQ), validated on held-out train
               items, tested on each task's test split (the first ``--test-size``
               items of each, a stated subset; all of them with --test-size 0).

Zero-shot transfer (``--transfer``; on with ``--full``): every seed's model is also
scored on the other task family, untrained on it (commonsense models on SST-2 dev,
SST-2 models on the commonsense test subsets), against the untrained base: how much
of the base model's ability each method keeps.

Methods (``--methods``; default braces-r16, lora-qv-r16, lora-qv-rmatch, ia3 and
loreft-r16, ``--full`` adds braces-r16:gate=-5, dora-qv-r16 and lora-all-r16;
``-rmatch`` resolves to the rank whose count is closest to braces' at ``--rank``):
  braces-rN[:gate=G,glr=K]  braces of rank N on every FFN; gate logit init G (default
                            ``mlx_braces``' default), the gate's learning rate K × the
                            rate (LoRA+-style; default 1)
  lora-qv-rN / dora-qv-rN   mlx-lm LoRA / DoRA on q_proj, v_proj (the paper's peer)
  lora-all-rN               mlx-lm LoRA on every linear layer of every block
  ia3                       IA³ (PEFT's Llama targets: k, v outputs, down input)
  loreft-rN[:layers=S,pos=P] LoReFT on the residual stream after every S-th block
                            (default 2: about braces' count) at prompt positions P
                            (default f3+l3: the first and last 3 prompt tokens)

    python scripts/bench_quality.py                       # default: SST-2, < 1 h
    python scripts/bench_quality.py --tasks commonsense --transfer --test-size 100
    python scripts/bench_quality.py --model gemma-3-270m
    python scripts/bench_quality.py --full                # publication size, hours
    python scripts/bench_quality.py --methods braces-r16 lora-qv-r16 --seeds 0
    python scripts/bench_quality.py --report a.json b.json   # tables of earlier runs

``--jobs`` (default: 2 on a CPU with two or more cores, else 1) splits the methods
round robin over that many processes, each on cores / jobs threads: on a 2-core CPU
two single-threaded trainings get more done than one on two threads. Their results
are merged into one JSON. Each prints a progress line per run with its own estimated
time left, then the tables follow, and the JSON is written (``--output``). Times are
noisy on a shared machine: compare methods within one run (the tables give ratios to
the paper's peer, lora-qv).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_braces import peers
from mlx_braces.braces import (
    apply_braces,
    braced_layers,
    find_ffns,
    linear_dims,
    orthonormality_error,
    orthonormalize,
    trainable_parameter_count,
)
from mlx_braces.evaluate import encode_pair, make_prompt, response_prefix
from mlx_braces.loading import load
from mlx_braces.models import EMBEDDED_DATA, QUICKSTART_MODEL
from mlx_braces.quantize import fast_dtype

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
LLM_ADAPTERS = Path("AGI-Edgerunners__LLM-Adapters") / "dataset"
CS_TASKS = {  # name -> folder in LLM-Adapters' dataset/
    "boolq": "boolq",
    "arc-e": "ARC-Easy",
    "arc-c": "ARC-Challenge",
    "obqa": "openbookqa",
}
PEER = "lora-qv"  # the paper's baseline
DEFAULT_METHODS = [  # the default run: under an hour on a 2-core CPU (README)
    "braces-r16",  # mlx_braces' defaults (gate -2)
    "lora-qv-r16",
    "lora-qv-rmatch",
    "ia3",
    "loreft-r16",
]
MORE_METHODS = ["braces-r16:gate=-5", "dora-qv-r16", "lora-all-r16"]  # --full adds
LR_GRIDS = {  # each method's own grid; a pick at an edge extends it
    "braces": [1e-3, 3e-3, 1e-2],
    "lora-qv": [3e-5, 1e-4, 3e-4],
    "dora-qv": [3e-5, 1e-4, 3e-4],
    "lora-all": [1e-5, 3e-5, 1e-4],
    "ia3": [1e-3, 3e-3, 1e-2],
    "loreft": [1e-4, 3e-4, 1e-3],
}
_METHOD = re.compile(
    r"^(?P<kind>braces|lora-qv|dora-qv|lora-all|loreft)-r(?P<rank>\d+|match)"
    r"(?::(?P<opts>[a-z]+=[^,]+(?:,[a-z]+=[^,]+)*))?$|^(?P<ia3>ia3)$"
)
_OPTIONS = {"braces": {"gate", "glr"}, "loreft": {"layers", "pos"}}


def _is_float(v: str, positive: bool = False) -> bool:
    try:
        x = float(v)
    except ValueError:
        return False
    return math.isfinite(x) and (x > 0 or not positive)


_OPTION_VALUE = {  # option -> (check, what is expected)
    "gate": (_is_float, "a finite number (the gate logit)"),
    "glr": (lambda v: _is_float(v, positive=True), "a positive number"),
    "layers": (lambda v: v.isdigit() and int(v) > 0, "a positive integer"),
    "pos": (
        lambda v: re.fullmatch(r"f\d+(\+l\d+)?|l\d+", v) is not None,
        "f<N>, l<N> or f<N>+l<N>",
    ),
}
SETTINGS = {  # the default run, and --full's publication-size one
    "default": dict(
        iters=40,
        batch_size=8,
        train_size=800,
        valid_size=100,
        test_size=200,
        transfer_size=200,
        transfer=False,
        cs_tasks=["arc-e", "arc-c", "obqa"],
        methods=DEFAULT_METHODS,
    ),
    "full": dict(
        iters=1000,
        batch_size=16,
        train_size=0,  # every training row
        valid_size=300,
        test_size=0,  # every test item
        transfer_size=0,
        transfer=True,
        cs_tasks=["boolq", "arc-e", "arc-c", "obqa"],
        methods=DEFAULT_METHODS + MORE_METHODS,
    ),
}


class BenchError(ValueError):
    """Bad benchmark input (one line)."""


# ---------------------------------------------------------------------------
# Methods


@dataclass
class Method:
    """One parsed ``--methods`` entry."""

    name: str
    kind: str
    rank: int = 0
    options: dict[str, str] = field(default_factory=dict)


def parse_method(spec: str, braces_rank: int, model: nn.Module | None) -> Method:
    """``braces-r16:gate=-2`` -> Method; ``-rmatch`` gets LoRA's count-matched rank
    on ``model`` (None: only check the spelling, before loading anything)."""
    m = _METHOD.match(spec)
    if m is None:
        raise BenchError(
            f"--methods: unknown method {spec!r} (expected e.g. braces-r16, "
            "braces-r16:gate=-2,glr=10, lora-qv-r16, lora-qv-rmatch, dora-qv-r16, "
            "lora-all-r16, ia3, loreft-r16:layers=2,pos=f3+l3)"
        )
    if m.group("ia3"):
        return Method(spec, "ia3")
    kind, opts = m.group("kind"), {}
    for kv in (m.group("opts") or "").split(",") if m.group("opts") else []:
        k, v = kv.split("=", 1)
        if k not in _OPTIONS.get(kind, set()):
            allowed = ", ".join(sorted(_OPTIONS.get(kind, ()))) or "none"
            raise BenchError(f"--methods {spec!r}: unknown option {k!r} ({allowed})")
        if not _OPTION_VALUE[k][0](v):
            raise BenchError(
                f"--methods {spec!r}: {k}={v!r}, expected {_OPTION_VALUE[k][1]}"
            )
        opts[k] = v
    rank = m.group("rank")
    if rank == "match":
        if kind == "loreft" or kind == "braces":
            raise BenchError(f"--methods {spec!r}: -rmatch is for the LoRA family")
        rank = 0 if model is None else matched_rank(model, kind, braces_rank)
    return Method(spec, kind, int(rank), opts)


def lora_keys(kind: str) -> list[str] | None:
    """mlx-lm LoRA keys: q and v, or None (mlx-lm's default: every linear layer)."""
    return None if kind == "lora-all" else ["self_attn.q_proj", "self_attn.v_proj"]


def lora_count(model: nn.Module, kind: str, rank: int) -> int:
    """LoRA's parameter count, ``rank·(d_in + d_out)`` per adapted linear."""
    total = 0
    for block in model.layers:
        for name, mod in block.named_modules():
            keys = lora_keys(kind)
            if (keys is None and isinstance(mod, (nn.Linear, nn.QuantizedLinear))) or (
                keys is not None and name in keys
            ):
                d_out, d_in = linear_dims(mod)[::-1]
                total += rank * (d_in + d_out) + (d_out if kind == "dora-qv" else 0)
    return total


def braces_count(model: nn.Module, rank: int) -> int:
    """Braces' parameter count, ``rank·d + 1`` per FFN."""
    return sum(
        rank * linear_dims(getattr(ffn, down))[1] + 1
        for _, _, ffn, down in find_ffns(model)
    )


def matched_rank(model: nn.Module, kind: str, braces_rank: int) -> int:
    """The LoRA rank whose parameter count is closest to braces' at ``braces_rank``."""
    target = braces_count(model, braces_rank)
    return min(
        range(1, 4 * braces_rank + 1),
        key=lambda r: abs(lora_count(model, kind, r) - target),
    )


def loreft_layers(model: nn.Module, method: Method) -> list[int]:
    """Every ``layers``-th block (default 2), counted so that the last block is one."""
    every = int(method.options.get("layers", 2))
    n = len(model.layers)
    return sorted(range(n - 1, -1, -every))


def loreft_positions(method: Method) -> tuple[int, int]:
    """(first, last) prompt positions from ``pos=f3+l3`` (default) or ``pos=l4``."""
    spec = method.options.get("pos", "f3+l3")
    first = last = 0
    for part in spec.split("+"):
        if not re.fullmatch(r"[fl]\d+", part):
            raise BenchError(
                f"--methods {method.name!r}: pos={spec!r} (e.g. f3+l3, l4)"
            )
        if part[0] == "f":
            first = int(part[1:])
        else:
            last = int(part[1:])
    return first, last


def apply_method(model: nn.Module, method: Method, seed: int) -> None:
    """Freeze ``model`` and add ``method``'s trainable parameters (drawn from ``seed``)."""
    mx.random.seed(seed)
    if method.kind == "ia3":
        peers.apply_ia3(model)
    elif method.kind == "braces":
        gate = method.options.get("gate")
        kw = {} if gate is None else {"gate_init": float(gate)}
        apply_braces(model, rank=method.rank, seed=seed, **kw)
    elif method.kind == "loreft":
        peers.apply_loreft(
            model, method.rank, layers=loreft_layers(model, method), seed=seed
        )
    else:
        model.freeze()
        config = {
            "rank": method.rank,
            "scale": 20.0,  # mlx_lm.lora's default lora_parameters
            "dropout": 0.0,
            "keys": lora_keys(method.kind),
        }
        linear_to_lora_layers(
            model, len(model.layers), config, use_dora=method.kind == "dora-qv"
        )


def make_optimizer(model: nn.Module, method: Method, lr: float) -> optim.Optimizer:
    """Adam at ``lr``; braces' gates at ``glr``·lr when asked (LoRA+-style)."""
    glr = float(method.options.get("glr", 1))
    if method.kind != "braces" or glr == 1:
        return optim.Adam(learning_rate=lr)
    return optim.MultiOptimizer(
        [optim.Adam(learning_rate=lr * glr), optim.Adam(learning_rate=lr)],
        [lambda path, _: path.endswith("gate")],
    )


def after_update(model: nn.Module) -> None:
    """Retract braces' and LoReFT's R onto orthonormal rows (no-ops without them)."""
    orthonormalize(model)
    peers.retract(model)


def gate_values(model: nn.Module) -> list[float]:
    """Every braced layer's gate g = sigmoid(ĝ) (empty for other methods)."""
    return [float(b.g) for _, b in braced_layers(model)]


# ---------------------------------------------------------------------------
# Data


@dataclass
class Split:
    """Multiple-choice items: (context ids, [option continuation ids]), gold, prompt len."""

    items: list[tuple[list[int], list[list[int]]]]
    golds: list[int]
    prompt_lengths: list[int]


def _read_json(path: Path) -> list[dict]:
    if not path.is_file():
        raise BenchError(
            f"{path}: not found (set --assets to the shared assets folder)"
        )
    with open(path) as f:
        return (
            json.load(f)
            if path.suffix == ".json"
            else [json.loads(line) for line in f if line.strip()]
        )


def _split(tokenizer, rows: list[tuple[str, str, list[str], int]]) -> Split:
    """Rows of (prompt, answer prefix, options, gold) -> token ids."""
    items, golds, plens = [], [], []
    for prompt, prefix, options, gold in rows:
        conts, ctx = [], None
        for o in options:
            c, cont = encode_pair(tokenizer, prompt, prefix + o)
            ctx = c
            conts.append(cont)
        items.append((ctx, conts))
        golds.append(gold)
        plens.append(len(ctx))
    return Split(items, golds, plens)


def _train_pairs(tokenizer, rows: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, prompt length) per (prompt, answer) row."""
    out = []
    for prompt, answer in rows:
        ctx, cont = encode_pair(tokenizer, prompt, answer)
        out.append((ctx + cont, len(ctx)))
    return out


def sst2(tokenizer, s: dict) -> dict:
    """Embedded SST-2: the train subset, held-out train sentences, full dev split."""
    labels = [" negative", " positive"]

    def rows(name: str, n: int) -> list[dict]:
        rs = _read_json(EMBEDDED_DATA / f"{name}.jsonl")
        return rs[:n] if n else rs

    def prompt(r: dict) -> str:
        return f"Review: {r['text']}\nSentiment:"

    train = rows("train", s["train_size"])
    return {
        "train": _train_pairs(
            tokenizer, [(prompt(r), labels[r["label"]]) for r in train]
        ),
        "valid": _split(
            tokenizer,
            [
                (prompt(r), "", labels, r["label"])
                for r in rows("valid", s["valid_size"])
            ],
        ),
        "test": {
            "sst2": _split(
                tokenizer,
                [
                    (prompt(r), "", labels, r["label"])
                    for r in rows("test", s["sst2_test_size"])
                ],
            )
        },
    }


def _cs_rows(items: list[dict]) -> list[tuple[str, str, list[str], int]]:
    """LLM-Adapters items -> (prompt, "the correct answer is ", options, gold)."""
    out = []
    for it in items:
        fmt = re.search(r"Answer format:\s*(\S+)", it["instruction"])
        options = fmt.group(1).split("/") if fmt else ["true", "false"]
        out.append(
            (make_prompt(it), response_prefix(it), options, options.index(it["answer"]))
        )
    return out


def commonsense(tokenizer, s: dict, assets: Path) -> dict:
    """LLM-Adapters tasks: one mixed training set, held-out validation, each test set."""
    train, valid, test = [], [], {}
    n_train, n_valid, n_test = s["train_size"], s["valid_size"], s["test_size"]
    per_task = len(s["cs_tasks"])
    for name in s["cs_tasks"]:
        folder = assets / LLM_ADAPTERS / CS_TASKS[name]
        rows = _read_json(folder / "train.json")
        random.Random(0).shuffle(rows)
        k = n_train // per_task if n_train else len(rows) - n_valid // per_task
        train += rows[:k]
        valid += rows[k : k + n_valid // per_task]
        items = _read_json(folder / "test.json")
        test[name] = _split(tokenizer, _cs_rows(items[:n_test] if n_test else items))
    random.Random(1).shuffle(train)
    return {
        "train": _train_pairs(
            tokenizer, [(make_prompt(it), it["output"]) for it in train]
        ),
        "valid": _split(tokenizer, _cs_rows(valid)),
        "test": test,
    }


# ---------------------------------------------------------------------------
# Forward passes that compute logits only where they are needed


def body_and_head(model: nn.Module):
    """(hidden states of inputs, hidden -> logits) for mlx-lm's decoder models."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        return None
    if "lm_head" in model:
        return inner, model.lm_head
    return inner, inner.embed_tokens.as_linear


def logits_at(model: nn.Module, inputs: mx.array, positions: mx.array) -> mx.array:
    """Logits at ``positions`` (B, K) of ``inputs`` (B, T): (B, K, V), in float32."""
    parts = body_and_head(model)
    if parts is None:  # unknown layout: the whole logits, then the positions
        logits = model(inputs)
        return mx.take_along_axis(logits, positions[..., None], axis=1).astype(
            mx.float32
        )
    body, head = parts
    h = body(inputs)  # (B, T, d)
    picked = mx.take_along_axis(h, positions[..., None], axis=1)  # (B, K, d)
    return head(picked).astype(mx.float32)


def set_positions(model: nn.Module, method: Method, plens: list[int], T: int) -> None:
    """LoReFT's intervention positions for a right-padded batch (no-op for others)."""
    if method.kind == "loreft":
        first, last = loreft_positions(method)
        peers.set_positions(
            model, peers.positions_mask(plens, T, first=first, last=last)
        )


# ---------------------------------------------------------------------------
# Training and scoring


def batches(data: list[tuple[list[int], int]], batch_size: int, iters: int, seed: int):
    """``iters`` batches in a seeded order (the same for every method): epochs of
    shuffled rows, each batch right-padded. Yields (inputs, positions, targets,
    mask, prompt lengths, tokens)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(iters):
        while len(order) < batch_size:
            order += list(rng.permutation(len(data)))
        idx, order = order[:batch_size], order[batch_size:]
        rows = [data[i] for i in idx]
        T = max(len(t) for t, _ in rows) - 1
        K = max(len(t) - p for t, p in rows)  # answer tokens
        inputs = np.zeros((len(rows), T), np.int32)
        pos = np.zeros((len(rows), K), np.int32)
        tgt = np.zeros((len(rows), K), np.int32)
        mask = np.zeros((len(rows), K), np.float32)
        for j, (toks, p) in enumerate(rows):
            n = len(toks) - p
            inputs[j, : len(toks) - 1] = toks[:-1]
            pos[j, :n] = np.arange(p - 1, len(toks) - 1)
            tgt[j, :n] = toks[p:]
            mask[j, :n] = 1
        yield (
            mx.array(inputs),
            mx.array(pos),
            mx.array(tgt),
            mx.array(mask),
            [p for _, p in rows],
            sum(len(t) for t, _ in rows),
        )


def answer_loss(model, inputs, positions, targets, mask):
    """Mean cross-entropy of the answer tokens (the prompt is context only)."""
    logits = logits_at(model, inputs, positions)  # (B, K, V)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.sum() / mask.sum()


def train_run(method: Method, data: dict, lr: float, seed: int, args) -> tuple:
    """Fine-tune a fresh base with ``method``; returns (model, stats)."""
    model, _ = load(args.model, dequantize=args.dequantize)
    apply_method(model, method, seed)
    model.train()
    params = trainable_parameter_count(model)
    opt = make_optimizer(model, method, lr)
    step = nn.value_and_grad(model, answer_loss)
    losses, tokens = [], 0
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for inputs, pos, tgt, mask, plens, ntok in batches(
        data["train"], args.batch_size, args.iters, seed
    ):
        set_positions(model, method, plens, inputs.shape[1])
        loss, grads = step(model, inputs, pos, tgt, mask)
        opt.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), opt.state)
        after_update(model)
        losses.append(loss.item())
        tokens += ntok
    mx.eval(model.parameters())
    seconds = time.perf_counter() - tic
    model.eval()
    stats = {
        "trainable_parameters": params,
        "train_seconds": seconds,
        "train_tokens_per_second": tokens / seconds,
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "final_train_loss": float(np.mean(losses[-10:])),
        "orthonormality_error": max(
            orthonormality_error(model), peers.loreft_orthonormality_error(model)
        ),
    }
    if method.kind == "braces":
        stats["gates"] = gate_values(model)
    return model, stats


def option_logprobs(
    model: nn.Module, method: Method, split: Split, batch_size: int
) -> list[np.ndarray]:
    """Each item's options' summed log-probabilities, in item order, up to a constant
    per item (the log-probability of the tokens every option shares, which neither
    the pick nor the option-normalised likelihood depends on).

    Items whose options share every token but a last one (SST-2 and LLM-Adapters'
    answers on BPE vocabularies) take one forward pass of the shared part; others
    score every (context, option) sequence.
    """
    rows = []  # (item, option or None, sequence, positions, targets)
    for i, (ctx, conts) in enumerate(split.items):
        common = conts[0][:-1]
        if all(c[:-1] == common for c in conts):
            rows.append((i, None, ctx + common, [len(ctx) + len(common) - 1], None))
            continue
        for o, c in enumerate(conts):
            q = ctx + c
            rows.append((i, o, q[:-1], list(range(len(ctx) - 1, len(q) - 1)), c))
    out = [np.zeros(len(conts)) for _, conts in split.items]
    rows.sort(key=lambda r: -len(r[2]))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        T = max(len(r[2]) for r in chunk)
        K = max(len(r[3]) for r in chunk)
        inputs = np.zeros((len(chunk), T), np.int32)
        pos = np.zeros((len(chunk), K), np.int32)
        for j, r in enumerate(chunk):
            inputs[j, : len(r[2])] = r[2]
            pos[j, : len(r[3])] = r[3]
        set_positions(model, method, [split.prompt_lengths[r[0]] for r in chunk], T)
        logits = logits_at(model, mx.array(inputs), mx.array(pos))  # (B, K, V)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        for j, (i, o, _, p, c) in enumerate(chunk):
            if o is None:  # every option's last token at the one position
                out[i] = logp[j, 0, [cont[-1] for cont in split.items[i][1]]]
            else:
                out[i][o] = float(logp[j, np.arange(len(p)), c].sum())
    return out


def score(model: nn.Module, method: Method, split: Split, batch_size: int) -> dict:
    """Accuracy and the answer-restricted log-likelihood of the right options."""
    lps = option_logprobs(model, method, split, batch_size)
    correct = sum(int(np.argmax(lp) == g) for lp, g in zip(lps, split.golds))
    ll = [float(lp[g] - np.logaddexp.reduce(lp)) for lp, g in zip(lps, split.golds)]
    n = len(split.golds)
    return {"acc": correct / n, "option_ll": float(np.mean(ll)), "n": n}


# ---------------------------------------------------------------------------
# The protocol


class Clock:
    """Estimated time left from the seconds per run seen so far, per task."""

    def __init__(self, planned: dict[str, int]):
        self.planned = dict(planned)  # task -> runs not yet done
        self.seconds: dict[str, list[float]] = {t: [] for t in planned}
        self.start = time.perf_counter()

    def done(self, task: str, seconds: float) -> str:
        self.planned[task] = max(self.planned[task] - 1, 0)
        self.seconds[task].append(seconds)
        seen = [s for v in self.seconds.values() for s in v]
        left = sum(
            n * float(np.mean(self.seconds[t] or seen)) for t, n in self.planned.items()
        )
        return (
            f"elapsed {_clock(time.perf_counter() - self.start)}, ~{_clock(left)} left"
        )

    def extend(self, task: str, runs: int = 1) -> None:
        self.planned[task] += runs


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def grid_for(method: Method, args) -> list[float]:
    """The method's own learning-rate grid (``--lrs`` overrides every method's)."""
    return sorted(args.lrs or LR_GRIDS[method.kind])


def run_method(task: str, method: Method, data: dict, args, clock: Clock, out: dict):
    """Learning-rate pick on validation, then every seed on the test splits."""
    lrs = grid_for(method, args)
    valid, models = {}, {}
    ratio = lrs[1] / lrs[0] if len(lrs) > 1 else 3.0
    extensions, todo = 0, list(lrs)
    while todo:
        lr = todo.pop(0)
        tic = time.perf_counter()
        model, stats = train_run(method, data, lr, args.seeds[0], args)
        v = score(model, method, data["valid"], args.eval_batch_size)
        if not math.isfinite(stats["final_train_loss"]):
            v["option_ll"] = -math.inf  # diverged: never picked
        valid[lr], models[lr] = v, (model, stats)
        msg = clock.done(task, time.perf_counter() - tic)
        print(
            f"[{task}] {method.name:<26} lr {lr:<8.1e} valid acc {v['acc']:.3f} "
            f"ll {v['option_ll']:.3f}  | {msg}",
            flush=True,
        )
        if not todo:
            grid = sorted(valid)
            best = max(grid, key=lambda r: valid[r]["option_ll"])
            edge = best in (grid[0], grid[-1]) and len(grid) > 1
            if edge and extensions < args.max_extend:
                extensions += 1
                todo.append(best / ratio if best == grid[0] else best * ratio)
                clock.extend(task)
            # keep only the best model (memory)
            for r in list(models):
                if r != best:
                    models.pop(r)
    grid = sorted(valid)
    lr = max(grid, key=lambda r: valid[r]["option_ll"])
    at_edge = len(grid) > 1 and lr in (grid[0], grid[-1])
    runs = []
    for seed in args.seeds:
        tic = time.perf_counter()
        if seed == args.seeds[0]:
            model, stats = models.pop(lr)
        else:
            model, stats = train_run(method, data, lr, seed, args)
        tests = {
            name: score(model, method, split, args.eval_batch_size)
            for name, split in data["test"].items()
        }
        transfer = {}
        if data.get("transfer"):
            transfer = {
                name: score(model, method, split, args.eval_batch_size)["acc"]
                for name, split in data["transfer"].items()
            }
        accs = {k: v["acc"] for k, v in tests.items()}
        runs.append({"seed": seed, "test_acc": accs, "transfer_acc": transfer, **stats})
        del model
        msg = clock.done(task, time.perf_counter() - tic)
        shown = " ".join(f"{k} {v:.3f}" for k, v in accs.items())
        print(
            f"[{task}] {method.name:<26} lr {lr:<8.1e} seed {seed} test {shown} "
            f"({stats['train_seconds']:.0f}s, {stats['train_tokens_per_second']:.0f} "
            f"tok/s)  | {msg}",
            flush=True,
        )
    out["methods"][method.name] = summarize(method, lr, at_edge, valid, runs)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), (
        float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    )


def summarize(method, lr, at_edge, valid, runs) -> dict:
    """Per-method results: mean ± std per test set (and their average), costs."""
    names = list(runs[0]["test_acc"])
    acc = {k: _mean_std([r["test_acc"][k] for r in runs]) for k in names}
    if len(names) > 1:
        acc["average"] = _mean_std(
            [np.mean(list(r["test_acc"].values())) for r in runs]
        )
    out = {
        "kind": method.kind,
        "rank": method.rank,
        "options": method.options,
        "lr": lr,
        "at_edge": at_edge,
        "valid_by_lr": {f"{r:g}": v for r, v in sorted(valid.items())},
        "test_acc": {k: {"mean": m, "std": s} for k, (m, s) in acc.items()},
        "trainable_parameters": runs[0]["trainable_parameters"],
        "train_tokens_per_second": float(
            np.mean([r["train_tokens_per_second"] for r in runs])
        ),
        "peak_memory_mb": float(max(r["peak_memory_mb"] for r in runs)),
        "runs": runs,
    }
    if runs[0]["transfer_acc"]:
        tnames = list(runs[0]["transfer_acc"])
        t = {k: _mean_std([r["transfer_acc"][k] for r in runs]) for k in tnames}
        t["average"] = _mean_std(
            [np.mean(list(r["transfer_acc"].values())) for r in runs]
        )
        out["transfer_acc"] = {k: {"mean": m, "std": s} for k, (m, s) in t.items()}
    return out


def write_json(results: dict, path: str) -> None:
    """Write the results so far (after every method: an interrupted run keeps them)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def run_task(
    task: str, args, clock: Clock, methods: list[Method], results: dict
) -> dict:
    """Data, the untrained base's scores, then every method."""
    base, tokenizer = load(args.model, dequantize=args.dequantize)
    s = {
        "train_size": args.train_size,
        "valid_size": args.valid_size,
        "test_size": args.test_size,
        "cs_tasks": args.cs_tasks,
        "sst2_test_size": args.sst2_test_size,
    }
    assets = Path(args.assets)
    data = sst2(tokenizer, s) if task == "sst2" else commonsense(tokenizer, s, assets)
    if args.transfer:  # the other family's test sets, untrained on them
        ts = {**s, "train_size": 1, "test_size": args.transfer_size}
        if task == "sst2":
            data["transfer"] = commonsense(tokenizer, ts, assets)["test"]
        else:
            ts["sst2_test_size"] = args.transfer_size
            data["transfer"] = sst2(tokenizer, ts)["test"]
    none = Method("base", "base")
    out = {
        "n_train": len(data["train"]),
        "n_valid": len(data["valid"].golds),
        "n_test": {k: len(v.golds) for k, v in data["test"].items()},
        "base_acc": {
            k: score(base, none, v, args.eval_batch_size)["acc"]
            for k, v in data["test"].items()
        },
        "majority_acc": {
            k: float(np.bincount(v.golds).max() / len(v.golds))
            for k, v in data["test"].items()
        },
        "methods": {},
    }
    results["tasks"][task] = out
    if data.get("transfer"):
        out["base_transfer_acc"] = {
            k: score(base, none, v, args.eval_batch_size)["acc"]
            for k, v in data["transfer"].items()
        }
        out["n_transfer"] = {k: len(v.golds) for k, v in data["transfer"].items()}
    del base
    shown = ", ".join(f"{k} {v:.3f}" for k, v in out["base_acc"].items())
    print(
        f"[{task}] train {out['n_train']}, valid {out['n_valid']}, test "
        f"{out['n_test']}; untrained: {shown}",
        flush=True,
    )
    for method in methods:
        run_method(task, method, data, args, clock, out)
        write_json(results, args.output)
    return out


# ---------------------------------------------------------------------------
# Report


def _pm(d: dict) -> str:
    return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"


def table(task: str, r: dict) -> str:
    """Markdown: accuracy mean ± std per test set, params, speed, memory, vs the peer."""
    names = list(next(iter(r["methods"].values()))["test_acc"]) if r["methods"] else []
    peers = [m for m in r["methods"].values() if m["kind"] == PEER]
    peer = max(peers, key=lambda m: m["rank"]) if peers else None  # not -rmatch
    head = ["method", "lr", *names, "params", "params / lora-qv", "tok/s", "peak MB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in r["methods"].items():
        ratio = (
            f"{m['trainable_parameters'] / peer['trainable_parameters']:.2f}"
            if peer
            else "–"
        )
        edge = " (edge)" if m["at_edge"] else ""
        rows.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{m['lr']:.0e}{edge}",
                    *(_pm(m["test_acc"][k]) for k in names),
                    f"{m['trainable_parameters']:,}",
                    ratio,
                    f"{m['train_tokens_per_second']:.0f}",
                    f"{m['peak_memory_mb']:.0f}",
                ]
            )
            + " |"
        )
    base = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["base_acc"].items())
    major = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["majority_acc"].items())
    rows.append(f"\nuntrained: {base}; majority class: {major}; n_test {r['n_test']}")
    if "base_transfer_acc" in r:
        tn = list(r["base_transfer_acc"])
        rows.append(
            f"\nzero-shot transfer after {task} training (n {r['n_transfer']}):\n"
        )
        rows.append("| method | " + " | ".join([*tn, "average"]) + " |")
        rows.append("|" + "---|" * (len(tn) + 2))
        b = r["base_transfer_acc"]
        rows.append(
            "| untrained | "
            + " | ".join(f"{100 * b[k]:.2f}" for k in tn)
            + f" | {100 * np.mean(list(b.values())):.2f} |"
        )
        for name, m in r["methods"].items():
            t = m["transfer_acc"]
            rows.append(
                f"| {name} | " + " | ".join(_pm(t[k]) for k in [*tn, "average"]) + " |"
            )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=QUICKSTART_MODEL, help="Name, folder or Hub id.")
    p.add_argument(
        "--dequantize",
        default="auto",
        help="Dtype to dequantize a quantized base to ('none' keeps it; default: "
        "float32 where quantized kernels are slow, i.e. a CPU).",
    )
    p.add_argument(
        "--tasks", nargs="+", default=["sst2"], choices=["sst2", "commonsense"]
    )
    p.add_argument("--cs-tasks", nargs="+", choices=list(CS_TASKS))
    p.add_argument(
        "--transfer",
        action=argparse.BooleanOptionalAction,
        help="Also score each trained model on the other task family (default: off; "
        "on with --full).",
    )
    p.add_argument("--methods", nargs="+", help="Default: DEFAULT_METHODS.")
    p.add_argument(
        "--jobs",
        default="auto",
        help="Processes that split the methods between them, each on cores / jobs "
        "threads (auto: 2 on a CPU with 2+ cores, else 1).",
    )
    p.add_argument("--rank", type=int, default=16, help="Braces' rank for -rmatch.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, help="One grid for every method.")
    p.add_argument(
        "--max-extend", type=int, default=2, help="Grid extensions at edges."
    )
    p.add_argument("--full", action="store_true", help="Publication-size settings.")
    p.add_argument("--iters", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, help="Training rows (0: all).")
    p.add_argument("--valid-size", type=int, help="Validation items.")
    p.add_argument(
        "--test-size", type=int, help="Commonsense test items per task (0: all)."
    )
    p.add_argument(
        "--transfer-size", type=int, help="Transfer test items per task (0: all)."
    )
    p.add_argument(
        "--sst2-test-size", type=int, default=0, help="SST-2 dev items (0: all 872)."
    )
    p.add_argument("--assets", default=str(ASSETS), help="The shared assets folder.")
    p.add_argument("--output", default="bench_quality.json")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="Print the tables of earlier runs' JSON (merged by task), run nothing.",
    )
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset sizes from the default or --full settings; check the values."""
    for k, v in SETTINGS["full" if args.full else "default"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.dequantize_spec = args.dequantize  # as given (for --jobs' processes)
    if args.dequantize == "auto":
        args.dequantize = fast_dtype() or False
    elif args.dequantize == "none":
        args.dequantize = False
    for k in ("iters", "batch_size", "eval_batch_size"):
        if getattr(args, k) < 1:
            raise BenchError(
                f"--{k.replace('_', '-')}: expected >= 1, got {getattr(args, k)}"
            )
    for k in (
        "train_size",
        "valid_size",
        "test_size",
        "transfer_size",
        "sst2_test_size",
    ):
        if getattr(args, k) < 0:
            raise BenchError(
                f"--{k.replace('_', '-')}: expected >= 0, got {getattr(args, k)}"
            )
    if args.valid_size < 1:
        raise BenchError("--valid-size: expected >= 1 (the rate is picked on it)")
    if args.jobs == "auto":  # two single-threaded processes beat one with 2 threads
        on_cpu = mx.default_device().type == mx.DeviceType.cpu
        args.jobs = 2 if on_cpu and (os.cpu_count() or 1) >= 2 else 1
    elif not str(args.jobs).isdigit() or int(args.jobs) < 1:
        raise BenchError(f"--jobs: expected 'auto' or an integer >= 1, got {args.jobs}")
    args.jobs = min(int(args.jobs), len(args.methods))
    return args


def job_command(args: argparse.Namespace, methods: list[str], output: str) -> list[str]:
    """The command of one ``--jobs`` process: every resolved setting spelled out."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--jobs", "1"]
    cmd += ["--model", args.model, "--dequantize", args.dequantize_spec]
    cmd += ["--tasks", *args.tasks, "--cs-tasks", *args.cs_tasks]
    cmd += ["--methods", *methods, "--seeds", *map(str, args.seeds)]
    if args.lrs:
        cmd += ["--lrs", *map(repr, args.lrs)]
    for k in (
        "rank",
        "max_extend",
        "iters",
        "batch_size",
        "eval_batch_size",
        "train_size",
        "valid_size",
        "test_size",
        "transfer_size",
        "sst2_test_size",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--transfer" if args.transfer else "--no-transfer"]
    return [*cmd, "--assets", args.assets, "--output", output]


def run_jobs(args: argparse.Namespace, names: list[str]) -> dict:
    """Split the methods over ``args.jobs`` processes (round robin), each on its share
    of the cores; their progress lines are prefixed ``[job k]``; the results merged."""
    groups = [args.methods[k :: args.jobs] for k in range(args.jobs)]
    parts = [f"{args.output}.job{k}.json" for k in range(args.jobs)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    procs = []
    for k, (group, part) in enumerate(zip(groups, parts)):
        print(f"[job {k}] {' '.join(group)} ({threads} thread(s))", flush=True)
        procs.append(
            subprocess.Popen(
                job_command(args, group, part),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )

    def relay(k: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(f"[job {k}] {line}", end="", flush=True)

    relays = [
        threading.Thread(target=relay, args=(k, proc), daemon=True)
        for k, proc in enumerate(procs)
    ]
    for t in relays:
        t.start()
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        raise
    for t in relays:
        t.join()
    failed = [k for k, c in enumerate(codes) if c != 0]
    if failed:
        raise BenchError(
            f"job(s) {', '.join(map(str, failed))} failed (their output is above); "
            f"finished methods are in {', '.join(parts[k] for k in failed)}"
        )
    merged = merge(parts)
    for task in merged["tasks"].values():  # methods in --methods order
        done = task["methods"]
        task["methods"] = {m: done[m] for m in names if m in done}
    for part in parts:
        Path(part).unlink()
    return merged


def merge(paths: list[str]) -> dict:
    """The results of several runs (e.g. methods split over processes), task by task.

    A task's untrained scores must agree between files (same model and data)."""
    merged: dict = {"tasks": {}, "sources": []}
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
            tasks = r["tasks"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{path}: not a bench_quality.py JSON ({e})") from None
        merged["sources"].append({"file": path, "command": r.get("command")})
        for task, t in tasks.items():
            have = merged["tasks"].setdefault(task, {**t, "methods": {}})
            if have["base_acc"] != t["base_acc"]:
                raise BenchError(
                    f"{path}: task {task!r} has untrained scores {t['base_acc']}, "
                    f"another file {have['base_acc']} (a different model or data)"
                )
            have["methods"].update(t["methods"])
    return merged


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            merged = merge(args.report)
        except BenchError as e:
            sys.exit(f"Error: {e}")
        for task, r in merged["tasks"].items():
            print(f"\n## {task}\n\n" + table(task, r))
        return
    try:
        args = resolve_args(args)
        for spec in args.methods:
            parse_method(spec, args.rank, None)
        probe, _ = load(args.model, dequantize=args.dequantize)
        methods = [parse_method(s, args.rank, probe) for s in args.methods]
        del probe
        command = " ".join(
            ["python", "scripts/bench_quality.py", *(argv or sys.argv[1:])]
        )
        if args.jobs > 1:
            tic = time.perf_counter()
            merged = run_jobs(args, [m.name for m in methods])
            results = {
                "command": command,
                "settings": _settings(args),
                "device": str(mx.default_device()),
                "jobs": args.jobs,
                "tasks": merged["tasks"],
            }
            _finish(results, args, tic)
            return
        per_method = len(args.seeds)
        clock = Clock(
            {
                t: sum(len(grid_for(m, args)) + per_method for m in methods)
                for t in args.tasks
            }
        )
        results = {
            "command": command,
            "settings": _settings(args),
            "device": str(mx.default_device()),
            "jobs": 1,
            "tasks": {},
        }
        tic = time.perf_counter()
        for task in args.tasks:
            run_task(task, args, clock, methods, results)
    except (BenchError, mlx_braces.ModelLoadError, mlx_braces.GGUFError) as e:
        sys.exit(f"Error: {e}")
    _finish(results, args, tic)


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "dequantize_spec"}


def _finish(results: dict, args: argparse.Namespace, tic: float) -> None:
    """Wall time, the tables, the JSON."""
    results["wall_seconds"] = time.perf_counter() - tic
    for task, r in results["tasks"].items():
        print(f"\n## {task}\n\n" + table(task, r))
    print(f"\nwall time {_clock(results['wall_seconds'])}")
    write_json(results, args.output)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
