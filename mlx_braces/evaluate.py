"""Evaluate a base model or an adapter: choice accuracy, LLM-Adapters accuracy, perplexity.

Data in the LLM-Adapters layout (a JSON list of ``{instruction, input, output,
answer}``, e.g. ``dataset/boolq/test.json``) is scored in one of two modes:

* ``mc``: each answer option is scored by the log-likelihood of its continuation
  after the Alpaca prompt; the best one is the prediction (``acc``; ``acc_norm``
  divides by the continuation's length in characters, as lm-evaluation-harness does).
* ``gen``: the LLM-Adapters/DoRA protocol: greedy generation after the Alpaca
  prompt, and the prediction is the first word of the task's answer vocabulary in
  the output.

Perplexity is computed on JSONL files in mlx-lm's text/completions/chat formats, and
lm-evaluation-harness tasks run through mlx-lm's own lm-eval model class, which sees
the adapter too (``mlx_lm.evaluate`` has no adapter option).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from . import data
from ._compat import swapped
from ._version import __version__
from .quantize import add_dequantize_argument

# The Stanford Alpaca template. LLM-Adapters' and DoRA's scripts use the same words
# but indent every line after the first by 16 spaces (and beam-search 4 at evaluation);
# here the template is the clean one and generation is greedy.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes the "
    "request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))
# Answer vocabularies of LLM-Adapters' commonsense_evaluate.py, by dataset folder.
TASKS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWERS,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": _ANSWERS,
    "ARC-Challenge": _ANSWERS,
    "openbookqa": _ANSWERS,
}
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S[^\n]*?)\s*$", re.MULTILINE)


class EvalError(ValueError):
    """Evaluation data or options that cannot be used; the message says why."""


@dataclass
class Task:
    """One LLM-Adapters data file: its items, answer options and answer vocabulary."""

    name: str
    path: Path
    items: list[dict[str, Any]]
    vocabulary: tuple[str, ...]
    options: list[list[str]]  # per item: its "Answer format:" options


# ---------------------------------------------------------------------------
# LLM-Adapters data


def task_name(name: str) -> str:
    """The canonical spelling of a known task name (case-insensitive), else ``name``."""
    known = {k.lower(): k for k in TASKS}
    return known.get(name.lower(), name)


def answer_format(instruction: str) -> list[str] | None:
    """The options an instruction lists in its ``Answer format: a/b/c`` line."""
    m = _ANSWER_FORMAT.search(instruction)
    if m is None:
        return None
    return [o.strip() for o in m.group(1).split("/") if o.strip()]


def load_task(path: str | Path, name: str | None = None) -> Task:
    """Read and check an LLM-Adapters JSON file; errors name the file and item.

    The task (and so its answer vocabulary) is ``name``, else the file's folder
    (``{data_dir}/{task}/test.json``). Unknown tasks take their vocabulary from the
    items' ``Answer format:`` lines.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    try:
        with open(path) as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise EvalError(
            f"{path}: expected a non-empty JSON list of "
            "{instruction, input, output, answer} objects (the LLM-Adapters layout)"
        )
    name = task_name(name or path.parent.name)
    options = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise EvalError(f"{path}: item {i} is not a JSON object")
        for key in ("instruction", "answer"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise EvalError(f"{path}: item {i} has no '{key}' string")
        options.append(answer_format(item["instruction"]))
    vocabulary = TASKS.get(name)
    if vocabulary is None:
        found = [o for opts in options if opts for o in opts]
        if not found:
            raise EvalError(
                f"{path}: task '{name}' has no known answer vocabulary and its items "
                f"have no 'Answer format:' line; known tasks: {', '.join(TASKS)}"
            )
        vocabulary = tuple(dict.fromkeys(found))
    for i, (item, opts) in enumerate(zip(items, options)):
        if opts is None:
            options[i] = opts = list(vocabulary)
        if item["answer"].strip() not in opts:
            raise EvalError(
                f"{path}: item {i}: answer {item['answer']!r} is not one of its "
                f"options {'/'.join(opts)}"
            )
    return Task(name, path, items, vocabulary, options)


def make_prompt(item: dict[str, Any]) -> str:
    """The Alpaca prompt of an item (with its ``input`` when there is one)."""
    if item.get("input"):
        return ALPACA_PROMPT_INPUT.format(**item)
    return ALPACA_PROMPT.format(instruction=item["instruction"])


def response_prefix(item: dict[str, Any]) -> str:
    """The answer-independent start of the item's ``output`` (``"the correct answer is "``)."""
    output, answer = item.get("output") or "", item["answer"].strip()
    return output[: -len(answer)] if output.endswith(answer) else ""


def option_texts(instruction: str, labels: list[str]) -> list[str]:
    """The text of each labelled option (``Answer2: <text>``), else the label itself."""
    starts = []
    for label in labels:
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}:[ \t]*", instruction, re.I)
        starts.append(m)
    ends = [m.start() for m in starts if m is not None]
    fmt = _ANSWER_FORMAT.search(instruction)
    if fmt is not None:
        ends.append(fmt.start())
    texts = []
    for label, m in zip(labels, starts):
        if m is None:
            texts.append(label)
            continue
        end = min([e for e in ends if e > m.start()], default=len(instruction))
        texts.append(instruction[m.end() : end].strip() or label)
    return texts


def extract_answer(text: str, vocabulary: tuple[str, ...] | list[str]) -> str | None:
    """The first whole word of ``vocabulary`` in ``text`` (any case), or None.

    LLM-Adapters takes the first regex match of the vocabulary; here a match must be
    a whole word ("answer10" is not "answer1", "untrue" is not "true") and case is
    ignored ("Solution2." is solution2). On outputs in the trained form ("the
    correct answer is answer3") both give the same prediction.
    """
    words = sorted(vocabulary, key=len, reverse=True)
    pattern = (
        r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, words)) + r")(?![A-Za-z0-9_])"
    )
    m = re.search(pattern, text, re.IGNORECASE)
    if m is None:
        return None
    found = m.group(1).lower()
    return next(w for w in vocabulary if w.lower() == found)


# ---------------------------------------------------------------------------
# Scoring


def encode_pair(
    tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as they are in the joined text.

    The pair is tokenized as one string (so a continuation's leading space tokenizes
    as it would in running text) and split where it stops agreeing with the
    context alone; trailing whitespace of the context moves to the continuation, as
    in lm-evaluation-harness.
    """
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    full = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context))
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    if k == 0:
        raise EvalError(f"context {context!r} has no tokens to condition on")
    if k == len(full):
        raise EvalError(f"continuation {continuation!r} has no tokens")
    return full[:k], full[k:]


def loglikelihoods(
    model: nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> list[float]:
    """Summed log-probability of each ``(context, continuation)`` token pair's continuation.

    Sequences are sorted by length, right-padded and scored ``batch_size`` at a time
    with one forward pass each; results come back in input order.
    """
    n = len(sequences)
    order = sorted(range(n), key=lambda i: -sum(map(len, sequences[i])))
    out = [0.0] * n
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
        idx = order[s : s + batch_size]
        lens = [len(sequences[i][0]) + len(sequences[i][1]) for i in idx]
        T = max(lens) - 1
        inputs = np.zeros((len(idx), T), np.int32)  # (B, T)
        targets = np.zeros((len(idx), T), np.int32)
        mask = np.zeros((len(idx), T), bool)
        for j, i in enumerate(idx):
            ctx, cont = sequences[i]
            toks = ctx + cont
            inputs[j, : len(toks) - 1] = toks[:-1]
            targets[j, : len(toks) - 1] = toks[1:]
            mask[j, len(ctx) - 1 : len(toks) - 1] = True
        first = int(mask.argmax(axis=1).min())  # no continuation starts earlier
        logits = model(mx.array(inputs))[:, first:].astype(mx.float32)  # (B, T', V)
        tgt = mx.array(targets[:, first:])
        picked = mx.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logp = picked - mx.logsumexp(logits, axis=-1)  # (B, T')
        sums = (logp * mx.array(mask[:, first:])).sum(axis=-1)
        for j, v in zip(idx, sums.tolist()):
            out[j] = v
    return out


def multiple_choice(
    model: nn.Module,
    tokenizer,
    contexts: list[str],
    choices: list[list[str]],
    golds: list[int],
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> dict[str, Any]:
    """Accuracy of picking the most likely choice after each context.

    Returns ``acc``, ``acc_norm`` (log-likelihood per character of the choice),
    ``n``, and per item ``predictions`` / ``predictions_norm`` (choice indices) and
    the choices' ``loglikelihoods``.
    """
    pairs = [(c, o) for c, opts in zip(contexts, choices) for o in opts]
    scores = loglikelihoods(
        model,
        [encode_pair(tokenizer, c, o) for c, o in pairs],
        batch_size,
        progress,
        desc,
    )
    it = iter(scores)
    grouped = [[next(it) for _ in opts] for opts in choices]  # per item
    preds = [int(np.argmax(ll)) for ll in grouped]
    preds_norm = [
        int(np.argmax(np.array(ll) / [max(len(o), 1) for o in opts]))
        for ll, opts in zip(grouped, choices)
    ]
    golds_arr = np.array(golds)
    return {
        "acc": float((np.array(preds) == golds_arr).mean()),
        "acc_norm": float((np.array(preds_norm) == golds_arr).mean()),
        "n": len(golds),
        "predictions": preds,
        "predictions_norm": preds_norm,
        "loglikelihoods": grouped,
    }


def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy completions of ``prompts`` with mlx-lm's batched generation."""
    from mlx_lm.generate import batch_generate

    texts = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = [tokenizer.encode(p) for p in prompts[s : s + batch_size]]
        texts.extend(
            batch_generate(
                model,
                tokenizer,
                chunk,
                max_tokens=max_tokens,
                prefill_batch_size=batch_size,
                completion_batch_size=batch_size,
            ).texts
        )
    return texts


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: Task,
    mode: str = "mc",
    mc_target: str = "label",
    batch_size: int = 8,
    max_tokens: int = 32,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy on one LLM-Adapters task, by log-likelihood (``mc``) or generation (``gen``).

    ``mc_target="label"`` scores the option labels ("answer2") after the item's
    response prefix ("the correct answer is "), what LLM-Adapters fine-tunes on;
    ``"text"`` scores the options' own text ("Answer2: <text>").
    Returns ``acc`` (and ``acc_norm`` for ``mc``), ``n`` and per-item ``samples``.
    """
    items = task.items[:limit] if limit else task.items
    options = task.options[: len(items)]
    golds = [opts.index(it["answer"].strip()) for it, opts in zip(items, options)]
    prompts = [make_prompt(it) for it in items]
    if mode == "gen":
        outputs = generate_texts(
            model, tokenizer, prompts, max_tokens, batch_size, progress, task.name
        )
        preds = [extract_answer(o, task.vocabulary) for o in outputs]
        hits = [p == it["answer"].strip() for p, it in zip(preds, items)]
        samples = [
            {"output": o, "prediction": p, "answer": it["answer"], "correct": h}
            for o, p, it, h in zip(outputs, preds, items, hits)
        ]
        return {"acc": float(np.mean(hits)), "n": len(items), "samples": samples}
    if mode != "mc":
        raise EvalError(f"mode must be 'mc' or 'gen', got {mode!r}")
    if mc_target == "label":
        choices = options
    elif mc_target == "text":
        choices = [option_texts(it["instruction"], o) for it, o in zip(items, options)]
    else:
        raise EvalError(f"mc_target must be 'label' or 'text', got {mc_target!r}")
    contexts = [p + response_prefix(it) for p, it in zip(prompts, items)]
    r = multiple_choice(
        model, tokenizer, contexts, choices, golds, batch_size, progress, task.name
    )
    samples = [
        {
            "prediction": opts[p],
            "answer": it["answer"],
            "correct": p == g,
            "loglikelihoods": ll,
        }
        for it, opts, p, g, ll in zip(
            items, options, r["predictions"], golds, r["loglikelihoods"]
        )
    ]
    return {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"], "samples": samples}


# ---------------------------------------------------------------------------
# Perplexity


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """JSON objects, one per line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    rows = [row for _, row in data.read_jsonl(path, EvalError)]
    if not rows:
        raise EvalError(f"{path}: no JSON lines")
    return rows


def windows(
    tokens: list[int], start: int, length: int
) -> list[tuple[list[int], list[int]]]:
    """Score ``tokens[start:]`` once each in windows of at most ``length`` inputs.

    Each window predicts the next ``length`` tokens with as much preceding context
    as fits (lm-evaluation-harness's rolling log-likelihood).
    """
    out = []
    for s in range(max(start, 1), len(tokens), length):
        e = min(s + length, len(tokens))
        w = max(0, e - length - 1)
        out.append((tokens[w:s], tokens[s:e]))
    return out


def perplexity(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    mask_prompt: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-token perplexity of a JSONL file in any mlx-lm dataset format.

    Documents are tokenized exactly as mlx-lm's trainer tokenizes them (its
    ``create_dataset``); with ``mask_prompt`` only completion tokens count.
    """
    from mlx_lm.tuner.datasets import create_dataset

    rows = read_jsonl(path)[:limit] if limit else read_jsonl(path)
    config = types.SimpleNamespace(mask_prompt=mask_prompt)
    try:
        dataset = create_dataset(rows, tokenizer, config)
        docs = [dataset.process(row) for row in rows]
    except (KeyError, ValueError) as e:
        raise EvalError(f"{path}: {e}") from None
    sequences = [
        w for toks, offset in docs for w in windows(toks, offset, max_seq_length)
    ]
    if not sequences:
        raise EvalError(f"{path}: no tokens to score")
    scores = loglikelihoods(model, sequences, batch_size, progress, Path(path).name)
    ntoks = sum(len(cont) for _, cont in sequences)
    nll = -sum(scores) / ntoks
    return {
        "perplexity": math.exp(nll),
        "nll_per_token": nll,
        "tokens": ntoks,
        "documents": len(docs),
    }


# ---------------------------------------------------------------------------
# lm-evaluation-harness


def lm_eval_model(
    model: nn.Module,
    tokenizer,
    batch_size: int = 8,
    max_tokens: int | None = None,
    use_chat_template: bool | None = None,
):
    """mlx-lm's lm-eval model (``mlx_lm.evaluate.MLXLM``) around an already loaded model.

    ``MLXLM`` loads by path with mlx-lm's loader; it is handed ``model`` instead, so
    braces (and LoRA) adapters loaded by :func:`mlx_braces.load` are evaluated.
    """
    try:
        import mlx_lm.evaluate as mlx_eval
    except ImportError as e:
        raise EvalError(
            f"lm-eval tasks need lm-evaluation-harness ({e}): pip install lm-eval"
        ) from None
    with swapped(mlx_eval, load=lambda *args, **kwargs: (model, tokenizer)):
        return mlx_eval.MLXLM(
            "mlx_braces",
            max_tokens=max_tokens,
            batch_size=batch_size,
            use_chat_template=use_chat_template,
        )


def run_lm_eval(lm, tasks: list[str], limit=None, num_shots=None, seed=123) -> dict:
    """``lm_eval.simple_evaluate`` on ``lm``, as ``mlx_lm.evaluate`` runs it."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        apply_chat_template=lm.use_chat_template,
        num_fewshot=num_shots,
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results["results"]


# ---------------------------------------------------------------------------
# Command line


def _names(values: list[str] | None) -> list[str]:
    return [n for v in values or [] for n in v.split(",") if n]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_braces.evaluate",
        description="Evaluate a model or adapter: accuracy on LLM-Adapters tasks "
        "(log-likelihood or generation), perplexity on JSONL, lm-eval tasks.",
    )
    p.add_argument(
        "--model", help="Model path or HF repo (default: the adapter's base)"
    )
    p.add_argument("--adapter-path", help="Braces, LoRA or DoRA adapter folder")
    p.add_argument(
        "--tasks",
        nargs="+",
        help="LLM-Adapters tasks, comma or space separated "
        f"(known: {', '.join(TASKS)}), read from --data-dir/TASK/test.json",
    )
    p.add_argument("--data-dir", help="An LLM-Adapters dataset/ folder")
    p.add_argument("--data", help="One LLM-Adapters JSON file (its task: --tasks NAME)")
    p.add_argument(
        "--mode",
        choices=["mc", "gen"],
        default="mc",
        help="mc: the most likely answer option wins; gen: greedy generation, then "
        "the first answer word in it (LLM-Adapters' protocol)",
    )
    p.add_argument(
        "--mc-target",
        choices=["label", "text"],
        default="label",
        help="mc scores the option label after the item's response prefix "
        "('the correct answer is answer2'), or the option's text",
    )
    p.add_argument("--limit", type=int, help="Only the first N items of each task/file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32, help="Generation length (gen)")
    p.add_argument("--ppl", nargs="+", help="JSONL files to compute perplexity on")
    p.add_argument("--mask-prompt", action="store_true", help="ppl on completions only")
    p.add_argument("--max-seq-length", type=int, default=2048, help="ppl window")
    p.add_argument(
        "--lm-eval-tasks", nargs="+", help="lm-evaluation-harness task names"
    )
    p.add_argument("--num-shots", type=int, help="lm-eval few-shot examples")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--output", help="Write the results as JSON to this file")
    p.add_argument(
        "--log-samples", action="store_true", help="Keep per-item outputs in --output"
    )
    add_dequantize_argument(p, "Evaluate")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is None and args.adapter_path is None:
        p.error("give --model (or an --adapter-path that records its base model)")
    if not (args.tasks or args.data or args.ppl or args.lm_eval_tasks):
        p.error("nothing to do: give --tasks/--data, --ppl or --lm-eval-tasks")
    if args.tasks and not (args.data_dir or args.data):
        p.error("--tasks needs --data-dir (an LLM-Adapters dataset/ folder)")
    if args.data and len(_names(args.tasks)) > 1:
        p.error("--data is one file: give at most one task name with it")
    for name in ("batch_size", "max_tokens", "max_seq_length", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _tasks(args: argparse.Namespace) -> list[Task]:
    names = _names(args.tasks)
    if args.data:
        return [load_task(args.data, names[0] if names else None)]
    return [
        load_task(Path(args.data_dir) / task_name(n) / "test.json", n) for n in names
    ]


def _print_table(results: dict[str, Any]) -> None:
    rows = [
        (name, r["n"], r["acc"], r.get("acc_norm"))
        for name, r in results["tasks"].items()
    ]
    if rows:
        print(f"\n{'task':<16}{'n':>7}{'acc':>9}{'acc_norm':>10}")
        for name, n, acc, norm in rows:
            norm = "" if norm is None else f"{norm:.4f}"
            print(f"{name:<16}{n:>7}{acc:>9.4f}{norm:>10}")
        if len(rows) > 1:
            print(f"{'average':<16}{'':>7}{results['average_acc']:>9.4f}")
    for file, r in results.get("perplexity", {}).items():
        print(f"ppl {file}: {r['perplexity']:.4f} ({r['tokens']} tokens)")


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        if args.output:
            check_output(args.output)  # before the work, not after it
        results = run(args)
        _print_table(results)
        if args.output:
            try:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                with open(args.output, "w") as f:
                    json.dump(results, f, indent=2)
            except OSError as e:
                raise EvalError(f"--output {args.output}: cannot write ({e})") from None
            print(f"Wrote {args.output}")
    except ValueError as e:  # EvalError, AdapterError and mlx-lm's data errors
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


def check_output(path: str | Path) -> None:
    """Raise EvalError unless ``path`` can be written as a results file."""
    path = Path(path)
    if path.is_dir():
        raise EvalError(
            f"--output {path}: is a folder; give a file name, e.g. "
            f"{path / 'results.json'}"
        )
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise EvalError(f"--output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise EvalError(f"--output {path}: cannot write in {parent}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model (with its adapter) and run every evaluation ``args`` asks for."""
    from .loading import load

    tasks = _tasks(args)  # check the data before loading a model
    for file in args.ppl or []:
        read_jsonl(file)
    if args.lm_eval_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise EvalError(
                "--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval"
            ) from None
    mx.random.seed(args.seed)
    model, tokenizer = load(
        args.model,
        adapter_path=args.adapter_path,
        dequantize=getattr(args, "dequantize", None) or False,
    )
    results: dict[str, Any] = {
        "model": args.model,
        "adapter_path": args.adapter_path,
        "mlx_braces_version": __version__,
        "mode": args.mode,
        "mc_target": args.mc_target if args.mode == "mc" else None,
        "limit": args.limit,
        "tasks": {},
    }
    tic = time.perf_counter()
    for task in tasks:
        r = evaluate_task(
            model,
            tokenizer,
            task,
            args.mode,
            args.mc_target,
            args.batch_size,
            args.max_tokens,
            args.limit,
            progress=True,
        )
        if not args.log_samples:
            r.pop("samples")
        results["tasks"][task.name] = {"path": str(task.path), **r}
    if tasks:
        results["average_acc"] = float(
            np.mean([r["acc"] for r in results["tasks"].values()])
        )
    if args.ppl:
        results["perplexity"] = {
            file: perplexity(
                model,
                tokenizer,
                file,
                args.batch_size,
                args.max_seq_length,
                args.mask_prompt,
                args.limit,
                progress=True,
            )
            for file in args.ppl
        }
    if args.lm_eval_tasks:
        lm = lm_eval_model(model, tokenizer, args.batch_size)
        results["lm_eval"] = run_lm_eval(
            lm, _names(args.lm_eval_tasks), args.limit, args.num_shots, args.seed
        )
    results["seconds"] = time.perf_counter() - tic
    return results


if __name__ == "__main__":
    main()
