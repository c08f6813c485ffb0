"""The braces training loop: mlx-lm's compiled step with exact resume and safe saves.

``train`` mirrors ``mlx_lm.tuner.trainer.train`` (same arguments, output, callbacks)
and adds what a long run needs: a retraction of every ``R`` after each update, atomic
checkpoints that resume bit for bit (weights, optimizer and schedule state, data
position), a clean stop on a non-finite loss, and a checkpoint on Ctrl-C.

Nothing in the adapter folder changes before the run's first checkpoint; each
checkpoint replaces config, weights, resume state and metrics together
(:mod:`mlx_braces.commit`), so a failure or ``kill -9`` at any instant leaves the
folder's previous adapter or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset
from mlx_lm.tuner.trainer import TrainingArgs as _TrainingArgs
from mlx_lm.tuner.trainer import evaluate as _mlx_evaluate
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.trainer import iterate_batches as _pad_batches

from . import commit
from ._compat import TrainUI, clear_cache
from .adapters import (
    AdapterError,
    MetricsWriter,
    adapter_config,
    check_adapter_folder,
    checkpoint_name,
    load_resume,
    save_checkpoint,
)
from .braces import braced_layers, orthonormalize
from .commit import kill_point
from .data import check_batch_size
from .steering import effective_strengths, labelled, using_strengths

__all__ = [
    "Callbacks",
    "TrainingArgs",
    "TrainingError",
    "TrainingInterrupted",
    "check_batch_size",
    "default_loss",
    "evaluate",
    "iterate_batches",
    "train",
]


def default_loss(
    model, batch: mx.array, lengths: mx.array, strengths: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy over each row's targets: (loss, ntoks).

    mlx-lm's ``default_loss``, except that it does not score the padding token after
    each sequence (mlx-lm 0.32 does, ml-explore/mlx-lm#1697: on a short answer that
    one target can outweigh the answer). Row b scores tokens ``lengths[b, 0] + 1``
    ... ``lengths[b, 1] - 1`` (a prompt offset, then the sequence length).
    ``strengths`` (B, n_attr), an attribute dataset's per-row labels (one-hot, or
    zeros when unlabelled), steer each row through their effective strengths.
    """
    if strengths is not None:
        with using_strengths(model, effective_strengths(model, strengths)):
            return default_loss(model, batch, lengths)
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, L-1) each
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)  # target position = token index
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


class TrainingError(ValueError):
    """The loop cannot go on: a non-finite loss or update (I/O: AdapterError)."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after ``iteration``; ``adapter_path`` has its checkpoint."""

    def __init__(self, iteration: int, adapter_path: Path):
        super().__init__(f"interrupted after iteration {iteration}")
        self.iteration = iteration
        self.adapter_path = adapter_path


@dataclass
class TrainingArgs(_TrainingArgs):
    """mlx-lm's training arguments plus the seed of the data order and resume."""

    seed: int = field(default=0, metadata={"help": "Seed of the data order."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the checkpoint next to adapter_file."},
    )
    adapter_config: dict = field(
        default_factory=dict,
        metadata={"help": "Extra fields for adapter_config.json (model, settings)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an adapter of another kind in the adapter folder."},
    )


# ---------------------------------------------------------------------------
# Data


def _parts(item) -> tuple[Any, int, Any]:
    """``(tokens, offset, strengths or None)`` of an item: ``tokens``,
    ``(tokens, offset)`` or ``(tokens, offset, strengths)``."""
    if isinstance(item, tuple) and item and not isinstance(item[0], int):
        if len(item) == 3:
            return item
        if len(item) == 2:
            return item[0], item[1], None
    return item, 0, None


def iterate_batches(
    dataset,
    batch_size: int,
    max_seq_length: int,
    loop: bool = False,
    seed: int | None = None,
    comm_group=None,
    start: int = 0,
):
    """mlx-lm's batches in an order that can be restored exactly.

    Like mlx-lm, examples are sorted by length and cut into fixed batches whose
    order is shuffled each epoch; here epoch ``e``'s order is a permutation drawn
    from ``(seed, e)`` (seed None: 0, so that evaluation's first ``val_batches`` are
    the same random sample every time), and the ``start``-th batch of the stream is
    reached without replaying it. Yields ``(batch, lengths)``: (B/world, L) int32
    tokens and (B/world, 2) (offset, length), padded by mlx-lm; and when the items
    carry attribute strengths, ``(batch, lengths, strengths)``: (B/world, n_attr)
    float32.
    """
    rank, world = (
        (0, 1) if comm_group is None else (comm_group.rank(), comm_group.size())
    )
    check_batch_size(batch_size, len(dataset), world)
    idx = sorted(range(len(dataset)), key=lambda i: len(_parts(dataset[i])[0]))
    batch_idx = [
        idx[i : i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)
    ]
    epoch, pos = divmod(start, len(batch_idx))
    while True:
        rng = np.random.default_rng([seed or 0, epoch])
        order = rng.permutation(len(batch_idx))
        for i in order[pos:]:
            items = [_parts(dataset[j]) for j in batch_idx[i]]  # ascending length
            one = [(list(t[:max_seq_length]), o) for t, o, _ in items]
            # mlx-lm pads the batch and takes this worker's rows (rank::world); its
            # stable sort by length keeps the rows in this order.
            batch, lengths = next(
                _pad_batches(one, batch_size, max_seq_length, False, None, comm_group)
            )
            strengths = [s for *_, s in items]
            if all(s is None for s in strengths):
                yield batch, lengths
            elif any(s is None for s in strengths):
                raise ValueError(
                    "dataset items mix (tokens, offset, strengths) with items "
                    "without strengths"
                )
            else:
                yield batch, lengths, mx.array(strengths[rank::world], mx.float32)
        if not loop:
            break
        epoch, pos = epoch + 1, 0


def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int,
    num_batches: int,
    max_seq_length: int = 2048,
    loss: callable = default_loss,
    iterate_batches: callable = iterate_batches,
    clear_cache_threshold: int = 0,
    progress_callback: callable | None = None,
) -> float:
    """Mean loss per target token over ``num_batches`` batches (-1: all).

    mlx-lm's ``evaluate`` with this module's loss and batches as defaults: the one
    path validation and ``--test`` share (with attributes, each row is steered by its
    record's label).
    """
    return _mlx_evaluate(
        model,
        labelled(model, dataset, "evaluation example"),
        batch_size,
        num_batches,
        max_seq_length,
        loss,
        iterate_batches,
        clear_cache_threshold,
        progress_callback,
    )


def _batch_stream(iterate, dataset, args: TrainingArgs, world, start: int):
    """Training batches from ``start`` on: passed to ``iterate`` if it takes ``start``."""
    kwargs = dict(
        dataset=dataset,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        loop=True,
        seed=args.seed,
        comm_group=world,
    )
    if "start" in inspect.signature(iterate).parameters:
        yield from iterate(**kwargs, start=start)
        return
    stream = iterate(**kwargs)
    for _ in range(start):  # a custom iterator without `start`: replay its order
        next(stream)
    yield from stream


# ---------------------------------------------------------------------------
# Reporting


class Callbacks(TrainingCallback):
    """Several training callbacks as one (None entries are skipped)."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_loss_report(self, train_info: dict):
        for c in self.callbacks:
            c.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict):
        for c in self.callbacks:
            c.on_val_loss_report(val_info)


@contextlib.contextmanager
def _deferred_sigint():
    """Turn the first Ctrl-C into a flag the loop checks between iterations."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():  # a second Ctrl-C: stop now, the last checkpoint stays
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------
# The loop


def _compiled_step(model, optimizer, loss, grad_accum_steps: int, world_size: int):
    """mlx-lm's compiled step; also says whether the loss and new weights are finite."""
    loss_value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        if world_size > 1:
            # Weight each worker by its share of the batch's tokens: the average
            # below is then the gradient of the whole batch's mean loss, as on
            # one process.
            toks_f = toks.astype(mx.float32)
            total = mx.distributed.all_sum(toks_f, stream=mx.cpu)
            grad = tree_map(lambda g: g * (toks_f * world_size / total), grad)
            lvalue = mx.distributed.all_sum(lvalue * toks_f, stream=mx.cpu) / total
            toks = total  # report the whole batch, as one process would

        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)

        if do_update:
            grad = average_gradients(grad)
            if grad_accum_steps > 1:
                grad = tree_map(lambda x: x / grad_accum_steps, grad)
            optimizer.update(model, grad)
            grad = None

        ok = mx.isfinite(lvalue)
        for _, p in tree_flatten(model.trainable_parameters()):
            ok = ok & mx.all(mx.isfinite(p))
        return lvalue, toks, grad, ok

    return step, state


def train(
    model: nn.Module,
    optimizer,
    train_dataset,
    val_dataset=None,
    args: TrainingArgs | None = None,
    loss: callable = default_loss,
    iterate_batches: callable = iterate_batches,
    training_callback: TrainingCallback = None,
) -> int:
    """Train a braced ``model``; returns the last iteration done.

    Same arguments as ``mlx_lm.tuner.trainer.train``. Checkpoints go to the folder of
    ``args.adapter_file``: ``adapters.safetensors``, numbered copies, the adapter
    config, ``resume.safetensors`` and ``metrics.jsonl``; only rank 0 writes.
    Items of an attribute dataset (``steering.AttributeDataset``) carry per-row
    strengths, which the default batches and loss steer by. ``iterate_batches``/
    ``loss`` may be replaced (the loop calls ``loss(model, *batch)``). Raises TrainingError on a NaN/inf loss
    and TrainingInterrupted after saving on Ctrl-C.

    The folder is locked while the run lasts and changes only at checkpoints, each
    committed whole (:mod:`mlx_braces.adapters`); an adapter of another kind in it is
    only replaced with ``args.overwrite``. A folder or checkpoint that cannot be
    used, read or written raises AdapterError.
    """
    args = args or TrainingArgs()
    if not braced_layers(model):
        raise TrainingError("Model has no braced layers: call apply_braces first.")
    if args.grad_accumulation_steps < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    folder = Path(args.adapter_file).parent
    rank = mx.distributed.init().rank()
    if rank == 0:
        check_adapter_folder(folder, args.resume, args.overwrite)
    try:
        with commit.locked(folder) if rank == 0 else contextlib.nullcontext():
            return _train(
                model,
                optimizer,
                train_dataset,
                val_dataset,
                args,
                loss,
                iterate_batches,
                training_callback,
            )
    except commit.CommitError as e:  # the folder is locked, or its journal unreadable
        raise AdapterError(str(e)) from None


def _train(
    model,
    optimizer,
    train_dataset,
    val_dataset,
    args: TrainingArgs,
    loss,
    iterate_batches,
    training_callback,
) -> int:
    """The loop of :func:`train`, inside its folder lock."""
    world = mx.distributed.init()
    world_size, rank = world.size(), world.rank()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    # An adapter with attributes steers each row by its record's "attribute" label.
    train_dataset = labelled(model, _cached(train_dataset), "training example")
    val_dataset = labelled(model, _cached(val_dataset), "validation example")

    folder = Path(args.adapter_file).parent
    info: dict[str, Any] = {}
    grad_accum = None
    if args.resume:
        info, grad_accum = load_resume(model, optimizer, folder)
        _warn_changes(info, args, len(train_dataset), rank)
    else:
        optimizer.init(model.trainable_parameters())
    start = info.get("iteration", 0)
    last_good = (start, folder / info["weights"]) if args.resume else None

    # Nothing is written before the first checkpoint, which commits the config and
    # the metrics with the weights and resume state.
    metrics = MetricsWriter(folder, start, args.resume)
    config = adapter_config(model, **args.adapter_config)
    callback = Callbacks(metrics if rank == 0 else None, training_callback)

    step, state = _compiled_step(
        model, optimizer, loss, args.grad_accumulation_steps, world_size
    )
    window = info.get("window", {"loss": 0.0, "tokens": 0, "steps": 0})
    losses = mx.array(window["loss"], dtype=mx.float32)
    n_tokens = window["tokens"]
    steps = window["steps"]
    trained_tokens = info.get("trained_tokens", 0)
    train_time = 0.0

    def checkpoint(it: int, numbered: bool) -> Path:
        """Save (rank 0) what resumes at ``it``; returns the weights file."""
        nonlocal grad_accum
        if grad_accum is not None and world_size > 1:
            # Workers hold different partial sums; their mean gives the same update.
            grad_accum = average_gradients(grad_accum)
        file = Path(args.adapter_file)
        if rank == 0:
            names = [file.name]
            if numbered:
                file = folder / checkpoint_name(it)
                names.insert(0, file.name)
            resume = {
                "iteration": it,
                "trained_tokens": trained_tokens,
                "window": {"loss": losses.item(), "tokens": n_tokens, "steps": steps},
                "seed": args.seed,
                "batch_size": args.batch_size,
                "grad_accumulation_steps": args.grad_accumulation_steps,
                "train_examples": len(train_dataset),
                "weights": file.name,
            }
            save_checkpoint(
                folder, model, optimizer, grad_accum, resume, names, metrics, config
            )
        return file

    def validate(it: int) -> None:
        if args.val_batches == -1:
            val_total = len(val_dataset) // args.batch_size
        else:
            val_total = min(len(val_dataset) // args.batch_size, args.val_batches)
        tic = time.perf_counter()
        with ui.val_task(val_total) as advance_val:
            val_loss = evaluate(
                model=model,
                dataset=val_dataset,
                loss=loss,
                batch_size=args.batch_size,
                num_batches=args.val_batches,
                max_seq_length=args.max_seq_length,
                iterate_batches=iterate_batches,
                clear_cache_threshold=args.clear_cache_threshold,
                progress_callback=advance_val,
            )
        model.train()
        val_time = time.perf_counter() - tic
        ui.print(f"Iter {it}: Val loss {val_loss:.3f}, Val took {val_time:.3f}s")
        callback.on_val_loss_report(
            {"iteration": it, "val_loss": val_loss, "val_time": val_time}
        )

    model.train()
    ui = TrainUI(args.iters, rank, start)
    batches = _batch_stream(iterate_batches, train_dataset, args, world, start)
    it = start
    with ui, _deferred_sigint() as interrupted:
        if val_dataset and start == 0 and args.iters > 0:
            validate(0)
        for it, batch in zip(range(start + 1, args.iters + 1), batches):
            kill_point(f"step@{it}")
            tic = time.perf_counter()
            lvalue, toks, grad_accum, ok = step(
                batch, grad_accum, it % args.grad_accumulation_steps == 0
            )
            losses += lvalue
            mx.eval(state, losses, toks, grad_accum, ok)
            problem = None
            if not ok.item():
                value = lvalue.item()
                problem = f"loss is {value}"
                if math.isfinite(value):
                    problem = f"the update made a braces weight non-finite ({problem})"
            else:
                orthonormalize(model)  # retract every R onto orthonormal rows
                try:
                    mx.eval([m.R for _, m in braced_layers(model)])
                except RuntimeError:  # eigh of an overflowing R Rᵀ
                    problem = "the update made a brace's R overflow"
            if problem:
                where = (
                    f"last good checkpoint {last_good[1]} (iteration {last_good[0]}) "
                    "kept; continue from it with --resume"
                    if last_good
                    else "no checkpoint had been saved yet, and the adapter folder "
                    "was left as it was"
                )
                raise TrainingError(f"{problem} at iteration {it}; {where}")
            n_tokens += int(toks.item())
            steps += 1
            clear_cache(args.clear_cache_threshold)
            train_time += time.perf_counter() - tic
            ui.advance()

            if it % args.steps_per_report == 0 or it == args.iters:
                train_loss = losses.item() / steps
                lr = optimizer.state.get("learning_rate")
                learning_rate = lr.item() if isinstance(lr, mx.array) else lr
                it_sec = steps / train_time
                tokens_sec = n_tokens / train_time
                trained_tokens += n_tokens
                peak_mem = mx.get_peak_memory() / 1e9
                ui.print(
                    f"Iter {it}: Train loss {train_loss:.3f}, "
                    f"Learning Rate {learning_rate:.3e}, It/sec {it_sec:.3f}, "
                    f"Tokens/sec {tokens_sec:.3f}, Trained Tokens {trained_tokens}, "
                    f"Peak mem {peak_mem:.3f} GB"
                )
                callback.on_train_loss_report(
                    {
                        "iteration": it,
                        "train_loss": train_loss,
                        "learning_rate": learning_rate,
                        "iterations_per_second": it_sec,
                        "tokens_per_second": tokens_sec,
                        "trained_tokens": trained_tokens,
                        "peak_memory": peak_mem,
                    }
                )
                losses = mx.array(0.0, dtype=mx.float32)
                n_tokens, steps, train_time = 0, 0, 0.0

            if val_dataset and (it % args.steps_per_eval == 0 or it == args.iters):
                validate(it)

            stop = interrupted.is_set()
            if world_size > 1:  # stop together, whichever worker got the signal
                stop = (
                    mx.distributed.all_sum(mx.array(int(stop)), stream=mx.cpu).item()
                    > 0
                )
            if it % args.steps_per_save == 0 or stop:
                file = checkpoint(it, numbered=True)
                last_good = (it, file)
                ui.print(
                    f"Iter {it}: Saved adapter weights to {args.adapter_file} and "
                    f"{file}."
                )
            if stop:
                raise TrainingInterrupted(it, folder)

    if it == start and args.resume:
        ui.print(f"The checkpoint is at iteration {start}: nothing left to train.")
    else:
        if last_good is None or last_good[0] != it:  # not just saved
            checkpoint(it, numbered=False)
        ui.print(f"Saved final weights to {args.adapter_file}.")
    return it


def _cached(dataset):
    """An mlx-lm dataset (raw records + ``process``) that keeps each example's tokens."""
    if isinstance(dataset, CacheDataset) or not hasattr(dataset, "process"):
        return dataset
    return CacheDataset(dataset)


def _warn_changes(info: dict, args: TrainingArgs, n_train: int, rank: int) -> None:
    """Say which settings differ from the checkpoint's (the resume is then not exact)."""
    now = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "grad_accumulation_steps": args.grad_accumulation_steps,
        "train_examples": n_train,
    }
    changed = [f"{k} {v} (was {info[k]})" for k, v in now.items() if info.get(k) != v]
    if changed and rank == 0:
        print(
            "Warning: resuming with "
            + ", ".join(changed)
            + ": the data order differs from the interrupted run's"
        )
