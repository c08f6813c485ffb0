"""``python -m mlx_braces.train``: fine-tune braces the way ``mlx_lm.lora`` fine-tunes LoRA.

Same flags, YAML config (``-c``; the command line wins), data formats and progress
lines as mlx-lm, plus ``--rank``/``--gate-init`` for the braces, ``--epochs``, and an
exact ``--resume``. With no ``--model`` it trains the embedded stories260K model (4-bit
where its shapes allow) on the embedded SST-2 subset: a one-minute quickstart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx_lm.cli_ui import rprint

from .adapters import (
    METRICS_NAME,
    WEIGHTS_NAME,
    AdapterError,
    append_metrics,
    check_adapter_folder,
    check_base_gguf,
    load_adapter,
    load_weights_file,
)
from .braces import DEFAULT_GATE_INIT, apply_braces, print_trainable_parameters
from .data import DataError, check_batch_size, load_datasets
from .models import (
    EMBEDDED_DATA,
    EMBEDDED_MODEL,
    NAMED_MODELS,
    QUICKSTART_DATA,
    QUICKSTART_MODEL,
    is_local_path,
    named_model,
)
from .quantize import (
    QuantizeError,
    add_dequantize_argument,
    dequantize_dtype,
    dequantize_model,
    dtype_name,
    fast_dtype,
    is_quantized,
    quantize_base,
)
from .trainer import (
    Callbacks,
    TrainingArgs,
    TrainingError,
    TrainingInterrupted,
    default_loss,
    evaluate,
    iterate_batches,
    train,
)

__all__ = [
    "CONFIG_DEFAULTS",
    "EMBEDDED_DATA",
    "EMBEDDED_MODEL",
    "DataError",
    "TrainingArgs",
    "UsageError",
    "build_parser",
    "default_loss",
    "evaluate",
    "iterate_batches",
    "load_datasets",
    "main",
    "run",
    "train",
]

# mlx_lm.lora's optimizers, by the name its --optimizer takes.
OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}

# mlx-lm's defaults, except: braces on every layer (a brace costs rank·d + 1
# parameters and <1% of its FFN's compute), a learning rate for R and the gate
# (see README), no model/data (the quickstart's), and training without --train.
CONFIG_DEFAULTS = {
    "model": None,
    "train": False,
    "data": None,
    "optimizer": "adam",
    "optimizer_config": {name: {} for name in OPTIMIZERS},
    "seed": 0,
    "num_layers": -1,
    "batch_size": 4,
    "iters": 1000,
    "epochs": None,
    "val_batches": 25,
    "learning_rate": 1e-3,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume": False,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "rank": 16,
    "gate_init": DEFAULT_GATE_INIT,
    "attributes": None,
    "steer_only": False,
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
    "dequantize": None,
    "overwrite": False,
}

# With no --model, the quickstart: SmolLM2-135M-Instruct learns to answer "is this
# review positive or negative?" with the one-word label, in about a minute on 2 CPU
# cores. Picked by a sweep (README "Training"): all layers (the last 8 alone collapse
# to one label), 25 steps (20 are still biased), and gate -3 at lr 2e-3, the setting
# whose worse seed did best (gate -2 at 3e-3 collapsed on seed 1); float32 on a CPU,
# where 4-bit matmuls are ~25x slower (see --dequantize).
QUICKSTART_DEFAULTS = {
    "data": str(QUICKSTART_DATA),
    "mask_prompt": True,
    "iters": 25,
    "learning_rate": 2e-3,
    "gate_init": -3.0,
    "steps_per_report": 5,
    "steps_per_eval": 25,
    "val_batches": 2,
    "save_every": 25,
}

QUICKSTART_NOTE = (
    'Quickstart: braces teach SmolLM2-135M-Instruct to answer "Is this movie review '
    'positive or negative?" with one word, from 100 SST-2 reviews; then '
    "`python -m mlx_braces.generate` shows the base model's answer and the braced "
    "one. (Offline: --model stories260k.)"
)

# With --model stories260k: the embedded toy, quantized to 4 bits, on the embedded
# SST-2 text; a run that ends within a minute on 2 cores, at the learning rate that
# did best on it (README: "Learning rate"), with the gate it was measured with (the
# paper's -5). It needs no download (offline, tests).
EMBEDDED_DEFAULTS = {
    "iters": 200,
    "learning_rate": 1e-2,
    "gate_init": -5.0,
    "steps_per_eval": 100,
    "save_every": 100,
}

# YAML keys mlx-lm's dataset code reads, and LoRA keys that do not apply to braces.
DATA_KEYS = {
    "prompt_feature",
    "completion_feature",
    "text_feature",
    "chat_feature",
    "hf_dataset",
}
IGNORED_KEYS = {"fine_tune_type", "lora_parameters"}


class UsageError(ValueError):
    """A flag, config file or model the user gave that cannot be used."""


# ---------------------------------------------------------------------------
# Command line and YAML


# The command line, in mlx_lm.lora's order: (flags, type or FLAG, help). Every default
# is None, so that YAML and CONFIG_DEFAULTS fill what the command line leaves out.
FLAG = "store_true"
OPTIONS = [
    (
        ["--model"],
        str,
        "The path to the local model directory or Hugging Face repo, a named model "
        "(smollm2-135m-instruct, gemma-3-270m, stories260k) or a FILE.gguf "
        "(default: the quickstart, smollm2-135m-instruct; stories260k is embedded and "
        "trains 4-bit quantized, offline).",
    ),
    (["--train"], FLAG, "Do training (the default)."),
    (
        ["--data"],
        str,
        "Directory with {train, valid, test}.jsonl files or the name of a Hugging "
        "Face dataset (default: the quickstart's embedded SST-2 question, or with "
        "--model stories260k the embedded SST-2 text).",
    ),
    (
        ["--optimizer"],
        str,
        f"Optimizer to use for training: {', '.join(OPTIMIZERS)}.",
    ),
    (["--mask-prompt"], FLAG, "Mask the prompt in the loss when training."),
    (
        ["--num-layers"],
        int,
        "Number of layers to brace, counted from the last. Default is -1: all.",
    ),
    (["--rank"], int, "Rank of each brace's R (default 16)."),
    (
        ["--gate-init"],
        float,
        "Initial gate logit: g = sigmoid(gate) (default -2.0, g ≈ 0.12; the "
        "paper's -5.0 gives g ≈ 0.0067).",
    ),
    (
        ["--attributes"],
        str,
        "Train steering attributes: a YAML/JSON file {name: [words]} or a shipped "
        'set (sentiment, toxicity); data lines carry "attribute": name.',
    ),
    (
        ["--steer-only"],
        FLAG,
        "With --attributes: an adapter that only steers. The unconditioned brace "
        "trains beside the attributes (it takes up the data's domain) and is "
        "dropped after training, so the unsteered model is exactly the base.",
    ),
    (["--batch-size"], int, "Minibatch size."),
    (
        ["--iters"],
        int,
        "Iterations to train for (default 1000; quickstart 25, stories260k 200).",
    ),
    (
        ["--epochs"],
        int,
        "Train for this many passes over the training set instead of --iters "
        "(iters = epochs * (examples // batch size)).",
    ),
    (
        ["--val-batches"],
        int,
        "Number of validation batches, -1 uses the entire validation set.",
    ),
    (
        ["--learning-rate"],
        float,
        "Adam learning rate (default 1e-3; quickstart 2e-3, stories260k 1e-2).",
    ),
    (["--steps-per-report"], int, "Number of training steps between loss reporting."),
    (["--steps-per-eval"], int, "Number of training steps between validations."),
    (
        ["--grad-accumulation-steps"],
        int,
        "Number of steps to accumulate before each optimizer update.",
    ),
    (
        ["--resume"],
        FLAG,
        "Continue exactly from the last checkpoint in --adapter-path.",
    ),
    (
        ["--resume-adapter-file"],
        str,
        "Load path to resume training from the given fine-tuned weights (weights "
        "only: a fresh optimizer; see --resume).",
    ),
    (["--adapter-path"], str, "Save/load path for the fine-tuned weights."),
    (
        ["--overwrite"],
        FLAG,
        "Replace an adapter of another kind (e.g. mlx-lm LoRA) in --adapter-path.",
    ),
    (["--save-every"], int, "Save the model every N iterations."),
    (
        ["--test"],
        FLAG,
        "Evaluate on the test set after training (without --train: evaluate the "
        "adapter in --adapter-path).",
    ),
    (
        ["--test-batches"],
        int,
        "Number of test set batches, -1 uses the entire test set.",
    ),
    (["--max-seq-length"], int, "Maximum sequence length."),
    (["-c", "--config"], str, "A YAML configuration file with the training options."),
    (["--grad-checkpoint"], FLAG, "Use gradient checkpointing to reduce memory use."),
    (
        ["--clear-cache-threshold"],
        "size",
        "Clear the allocator cache between steps if it grows too large.",
    ),
    (
        ["--report-to"],
        str,
        "Services to report logs to ('wandb', 'swanlab', or 'wandb,swanlab').",
    ),
    (
        ["--project-name"],
        str,
        "Project name for logging. Defaults to the name of the root directory.",
    ),
    (["--seed"], int, "The PRNG seed."),
    (
        ["--trust-remote-code"],
        FLAG,
        "Enable trusting remote code for tokenizer/model loading.",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """mlx_lm.lora's parser, with the braces options instead of LoRA's."""
    from ._compat import parse_size

    parser = argparse.ArgumentParser(
        prog="mlx_braces.train",
        description="Braces fine-tuning (LLM Braces) of an mlx-lm model.",
    )
    for flags, kind, text in OPTIONS:
        if kind == FLAG:
            parser.add_argument(*flags, action=FLAG, default=None, help=text)
        else:
            kind = parse_size if kind == "size" else kind
            choices = list(OPTIMIZERS) if flags == ["--optimizer"] else None
            parser.add_argument(*flags, type=kind, choices=choices, help=text)
    add_dequantize_argument(parser, "Train on")
    return parser


def _read_yaml(file: str) -> dict[str, Any]:
    from ._compat import yaml_loader  # mlx-lm's loader: reads 1e-5 as a float

    try:
        with open(file) as f:
            config = yaml.load(f, yaml_loader())
    except OSError as e:
        raise UsageError(f"{file}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UsageError(f"{file}: not valid YAML{where} ({why})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(
            f"{file}: expected a mapping of options, got {type(config).__name__}"
        )
    return config


def resolve_args(cli: dict[str, Any]) -> types.SimpleNamespace:
    """Merge command line > YAML (``config``) > defaults, as mlx_lm.lora does.

    Also: with no --model the quickstart defaults (and with ``--model stories260k``
    the embedded model's) fill what was not given; ``--epochs`` replaces ``--iters``
    unless iters was given at a higher level. ``embedded`` says whether the model is
    the embedded stories260K, which is trained 4-bit quantized; ``quickstart`` that
    no model was given.
    """
    args = dict(cli)
    given = {k for k, v in cli.items() if v is not None}
    from_yaml: set[str] = set()
    if cli.get("config"):
        file = cli["config"]
        config = _read_yaml(file)
        known = set(CONFIG_DEFAULTS) | DATA_KEYS | IGNORED_KEYS
        unknown = sorted(set(config) - known)
        if unknown:
            raise UsageError(
                f"{file}: unknown option(s) {', '.join(unknown)}; known: "
                + ", ".join(sorted(known - IGNORED_KEYS))
            )
        for k, v in config.items():
            if k in IGNORED_KEYS:
                if k != "fine_tune_type" or v != "braces":
                    rprint(f"Note: {file}: '{k}' is a LoRA setting; braces ignore it.")
                continue
            if args.get(k) is None:
                args[k] = v
                from_yaml.add(k)
    level = {k: 2 for k in given} | {k: 1 for k in from_yaml}
    ie, ii = level.get("epochs", 0), level.get("iters", 0)
    if ie and ie == ii:
        where = "on the command line" if ie == 2 else f"in {cli['config']}"
        raise UsageError(
            f"Give iters or epochs, not both ({where})."
            if ie == 2
            else f"{cli['config']}: give iters or epochs, not both."
        )
    if ie < ii:
        args["epochs"] = None
    defaults = {}
    quickstart = args.get("model") is None
    if quickstart:
        args["model"] = QUICKSTART_MODEL
        defaults = {**QUICKSTART_DEFAULTS, "dequantize": fast_dtype()}
    embedded = named_model(args["model"]) is NAMED_MODELS["stories260k"]
    if embedded:
        defaults = EMBEDDED_DEFAULTS
    for k, v in defaults.items():
        if args.get(k) is None:
            args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    if not args["train"] and not args["test"]:
        args["train"] = True
    args = types.SimpleNamespace(**args)
    _check_args(args, from_yaml)
    args.embedded, args.quickstart = embedded, quickstart
    return args


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CHECKS = [  # (options, test, what they must be)
    (
        ("batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every"),
        lambda v: _is_int(v) and v >= 1,
        "a positive integer",
    ),
    (
        ("grad_accumulation_steps", "rank"),
        lambda v: _is_int(v) and v >= 1,
        "a positive integer",
    ),
    (("max_seq_length",), lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    (
        ("val_batches", "test_batches", "num_layers"),
        lambda v: _is_int(v) and (v == -1 or v >= 1),
        "-1 (all) or a positive integer",
    ),
    (("epochs",), lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer"),
    (("seed",), lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    (("learning_rate",), lambda v: _is_number(v) and v > 0, "a positive number"),
    (("gate_init",), _is_number, "a finite number"),
    (
        ("optimizer",),
        lambda v: isinstance(v, str) and v.lower() in OPTIMIZERS,
        f"one of {', '.join(OPTIMIZERS)}",
    ),
    (
        ("optimizer_config",),
        lambda v: (
            isinstance(v, dict)
            and all(s is None or isinstance(s, dict) for s in v.values())
        ),
        "a mapping of optimizer name -> settings",
    ),
    (
        ("lr_schedule",),
        lambda v: v is None or isinstance(v, dict),
        "a mapping (name, arguments, warmup)",
    ),
    (
        (
            "train",
            "test",
            "resume",
            "mask_prompt",
            "grad_checkpoint",
            "trust_remote_code",
            "overwrite",
            "steer_only",
        ),
        lambda v: isinstance(v, bool),
        "true or false",
    ),
    (
        (
            "model",
            "data",
            "adapter_path",
            "resume_adapter_file",
            "attributes",
            "report_to",
            "project_name",
            "prompt_feature",
            "completion_feature",
            "text_feature",
            "chat_feature",
        ),
        lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
        "a non-empty string",
    ),
    (
        ("clear_cache_threshold",),
        lambda v: _is_int(v) and v >= 0,
        "a size in bytes (e.g. 1GB, or an integer >= 0)",
    ),
    (
        ("hf_dataset",),
        lambda v: v is None or isinstance(v, (dict, list)),
        "a mapping (or a list of them) as mlx-lm reads it",
    ),
]


def _check_args(args: types.SimpleNamespace, from_yaml: set[str] = frozenset()) -> None:
    """Types and ranges of every option; a YAML value's error names its file."""
    from ._compat import parse_size

    size = getattr(args, "clear_cache_threshold", None)
    if "clear_cache_threshold" in from_yaml and isinstance(size, str):
        with contextlib.suppress(Exception):  # parse_size: decimal errors too
            args.clear_cache_threshold = parse_size(size)
    for keys, ok, what in CHECKS:
        for k in keys:
            if not hasattr(args, k) or ok(getattr(args, k)):
                continue
            value = getattr(args, k)
            flag = k.replace("_", "-")
            if k in from_yaml:
                hint = ""
                if what == "true or false" and str(value).lower() in ("true", "false"):
                    hint = " (a string: write it without quotes)"
                raise UsageError(
                    f"{args.config}: {k} (--{flag}) must be {what}, got {value!r}{hint}"
                )
            raise UsageError(
                f"{k} (--{flag}) must be {what}, got {value!r} (on the command line)"
            )
    try:
        dtype = dequantize_dtype(getattr(args, "dequantize", None))
    except QuantizeError as e:
        where = f"{args.config}: " if "dequantize" in from_yaml else ""
        raise UsageError(f"{where}{e} (--dequantize)") from None
    args.dequantize = None if dtype is None else dtype_name(dtype)
    if args.resume and args.resume_adapter_file:
        raise UsageError(
            "Give --resume (exact, from --adapter-path) or --resume-adapter-file, not both."
        )


# ---------------------------------------------------------------------------
# Model


def load_model(args) -> tuple[nn.Module, Any]:
    """mlx_lm.load of --model; the embedded model is quantized to 4 bits first."""
    from mlx_lm import load

    from .models import resolve_model

    try:  # a named model or .gguf: fetched/converted once into the cache
        path = resolve_model(args.model)
    except ValueError as e:  # ModelError, one line
        raise UsageError(str(e)) from None
    if is_local_path(path) and not Path(path).expanduser().exists():
        raise UsageError(f"--model {path}: no such folder")
    try:
        model, tokenizer, config = load(
            str(Path(path).expanduser()) if Path(path).expanduser().exists() else path,
            tokenizer_config={"trust_remote_code": args.trust_remote_code},
            trust_remote_code=args.trust_remote_code,
            return_config=True,
        )
    except (OSError, ValueError) as e:
        from .loading import model_load_message

        raise UsageError(model_load_message(path, e)) from None
    if args.embedded:
        model = quantize_embedded(model, config)
    if args.dequantize:
        if not is_quantized(model):
            rprint(f"Note: --dequantize: {args.model} has no quantized layers.")
        dequantize_model(model, args.dequantize)
        rprint(f"Dequantized the quantized layers to {args.dequantize} in memory.")
    elif fast_dtype() and is_quantized(model) and not args.embedded:  # ~25x slower
        rprint(
            "Note: on the CPU quantized matmuls are ~25x slower than float32; "
            "--dequantize trains in float32 (the adapter is the same)."
        )
    return model, tokenizer


def quantize_embedded(
    model: nn.Module, config: dict, bits: int = 4, group_size: int = 64
):
    """Quantize ``model`` as mlx-lm would (layers whose input dims fit the group size).

    Prints which layers are ``bits``-bit and which stay in full precision.
    """
    model, _ = quantize_base(model, config, bits=bits, group_size=group_size)
    quantized, full = {}, {}
    for name, m in model.named_modules():
        key = re.sub(r"layers\.\d+\.", "layers.*.", name)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized[key] = None
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            full[key] = (m.weight.shape[-1], m.weight.dtype)
    rprint(f"Quantized the embedded model to {bits} bits (group size {group_size}):")
    rprint(f"  {bits}-bit: {', '.join(quantized)}")
    for key, (dims, dtype) in full.items():
        why = (
            f"input dims {dims} not a multiple of {group_size}"
            if dims % group_size
            else "kept by mlx-lm's quantization rules"
        )
        rprint(f"  full precision ({str(dtype).split('.')[-1]}): {key} ({why})")
    return model


# ---------------------------------------------------------------------------
# Training and testing


def build_optimizer(args) -> optim.Optimizer:
    """mlx-lm's optimizer choice, settings (``optimizer_config``) and lr schedule."""
    from mlx_lm.tuner.utils import build_schedule

    lr = args.learning_rate
    where = f"{args.config}: " if getattr(args, "config", None) else ""
    if args.lr_schedule:
        _check_schedule(args.lr_schedule, where)
        try:
            lr = build_schedule(args.lr_schedule)
        except (KeyError, AttributeError, TypeError, IndexError) as e:
            raise UsageError(
                f"lr_schedule {args.lr_schedule}: cannot build it ({type(e).__name__}: "
                f"{e}); expected e.g. {{name: cosine_decay, arguments: [1e-3, 1000], "
                "warmup: 100}"
            ) from None
    name = args.optimizer.lower()
    settings = (args.optimizer_config or {}).get(name) or {}
    for k, v in settings.items():
        numbers = v if isinstance(v, (list, tuple)) else [v]
        if not numbers or not all(_is_number(x) for x in numbers):
            raise UsageError(
                f"{where}optimizer_config.{name}.{k} must be a number (or a list of "
                f"numbers), got {v!r}"
            )
    try:
        return OPTIMIZERS[name](learning_rate=lr, **settings)
    except TypeError as e:
        raise UsageError(f"optimizer_config.{name}: {e}") from None


def _check_schedule(schedule: dict[str, Any], where: str) -> None:
    """mlx-lm's lr_schedule keys, with their types (a string would fail mid-run)."""
    name, arguments = schedule.get("name"), schedule.get("arguments")
    if (
        not isinstance(name, str)
        or name.startswith("_")
        or not hasattr(optim.schedulers, name)
    ):
        raise UsageError(
            f"{where}lr_schedule.name must name an mlx.optimizers schedule (e.g. "
            f"cosine_decay, linear_schedule), got {name!r}"
        )
    if not isinstance(arguments, list) or not all(map(_is_number, arguments)):
        raise UsageError(
            f"{where}lr_schedule.arguments must be a list of numbers, got {arguments!r}"
        )
    warmup = schedule.get("warmup", 0)
    if not _is_int(warmup) or warmup < 0:
        raise UsageError(
            f"{where}lr_schedule.warmup must be an integer >= 0, got {warmup!r}"
        )
    init = schedule.get("warmup_init", 0.0)
    if not _is_number(init):
        raise UsageError(
            f"{where}lr_schedule.warmup_init must be a number, got {init!r}"
        )
    unknown = sorted(set(schedule) - {"name", "arguments", "warmup", "warmup_init"})
    if unknown:
        raise UsageError(
            f"{where}lr_schedule: unknown key(s) {', '.join(map(str, unknown))}; known: "
            "name, arguments, warmup, warmup_init"
        )


def _json_safe(config: dict[str, Any]) -> dict[str, Any]:
    safe = {}
    for k, v in config.items():
        with contextlib.suppress(TypeError, ValueError):
            json.dumps(v)
            safe[k] = v
    return safe


def train_model(
    args, model: nn.Module, train_set, valid_set, training_callback=None, tokenizer=None
) -> int:
    """Brace ``model`` as the options say and train it; returns the last iteration."""
    from mlx_lm.cli_ui import make_console, print_header_panel

    world = mx.distributed.init()
    mx.random.seed(args.seed)
    try:
        apply_braces(model, args.rank, args.num_layers, args.gate_init, seed=args.seed)
    except ValueError as e:
        raise UsageError(f"cannot brace {args.model}: {e}") from None
    if args.steer_only and not args.attributes:
        raise UsageError("--steer-only: it trains attributes; give --attributes too")
    if args.attributes:  # the conditional branch; data with per-row strengths
        from .steering import SteeringError, prepare_training

        try:
            train_set, valid_set = prepare_training(
                model,
                tokenizer,
                args.attributes,
                train_set,
                valid_set,
                seed=args.seed,
                steer_only=args.steer_only,
            )
        except SteeringError as e:
            raise UsageError(f"--attributes: {e}") from None
    if args.resume_adapter_file:
        rprint(f"Loading fine-tuned weights from {args.resume_adapter_file}")
        load_weights_file(model, args.resume_adapter_file)
    try:
        workers = world.size()
        check_batch_size(args.batch_size, len(train_set), workers, name="--batch-size")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.epochs:
        per_epoch = len(train_set) // args.batch_size
        args.iters = args.epochs * per_epoch
        rprint(
            f"{args.epochs} epoch(s) of {per_epoch} batches: {args.iters} iterations"
        )

    if world.rank() == 0:
        lr = "schedule" if args.lr_schedule else f"{args.learning_rate:.1e}"
        layers = "all" if args.num_layers == -1 else args.num_layers
        rows = [
            (
                "model",
                f"{EMBEDDED_MODEL.name} (embedded, 4-bit)"
                if args.embedded
                else args.model,
            ),
            ("type", f"braces · {layers} layers · rank {args.rank}"),
            ("dataset", _data_name(args.data)),
            ("optimizer", f"{args.optimizer} · lr {lr}"),
            ("batch · iters", f"{args.batch_size} · {args.iters:,}"),
            ("max seq", f"{args.max_seq_length:,}"),
        ]
        console = make_console()
        if console.is_terminal:
            print_header_panel(console, "mlx_braces.train", rows)
        else:
            print("mlx_braces.train: " + "; ".join(f"{k} {v}" for k, v in rows))
    print_trainable_parameters(model)

    adapter_path = Path(args.adapter_path)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in IGNORED_KEYS | {"embedded", "quickstart"}
    }
    # The base stays the quantized model; the dtype it was trained in is information.
    settings["dequantized"] = settings.pop("dequantize", None)
    if args.embedded:  # the folder, quantized in memory as the adapter records
        settings["model"] = str(EMBEDDED_MODEL)
        settings["base_quantization"] = {"bits": 4, "group_size": 64}
    else:  # a GGUF base: absolute path, base_gguf_sha256
        from .models import model_record

        settings.update(model_record(args.model))
    training_args = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        val_batches=args.val_batches,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        steps_per_save=args.save_every,
        adapter_file=str(adapter_path / WEIGHTS_NAME),
        max_seq_length=args.max_seq_length,
        grad_checkpoint=args.grad_checkpoint,
        grad_accumulation_steps=args.grad_accumulation_steps,
        clear_cache_threshold=args.clear_cache_threshold,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        adapter_config=_json_safe(settings),
    )
    return train(
        model=model,
        optimizer=build_optimizer(args),
        train_dataset=train_set,
        val_dataset=valid_set or None,
        args=training_args,
        training_callback=training_callback,
    )


def _data_name(data: str | None) -> str:
    """How the header names --data (the embedded sets by name)."""
    for folder in (EMBEDDED_DATA, QUICKSTART_DATA):
        if data is None and folder == EMBEDDED_DATA or data == str(folder):
            return f"{folder.name} (embedded)"
    return str(data)


def evaluate_model(args, model: nn.Module, test_set, iteration: int | None = None):
    """Test loss and perplexity, printed as mlx-lm does and added to metrics.jsonl.

    The loss is validation's: an adapter with attributes is steered per row by the
    test examples' labels.
    """
    from tqdm import tqdm

    from .steering import SteeringError, labelled

    try:
        test_set = labelled(model, test_set, "test example")
    except SteeringError as e:
        raise UsageError(f"--test: {e}") from None
    rank = mx.distributed.init().rank()
    n_batches = len(test_set) // args.batch_size
    if args.test_batches != -1:
        n_batches = min(n_batches, args.test_batches)
    show = rank == 0 and sys.stderr.isatty()
    pbar = tqdm(total=n_batches, desc="Calculating loss...") if show else None
    test_loss = evaluate(
        model=model,
        dataset=test_set,
        batch_size=args.batch_size,
        num_batches=args.test_batches,
        max_seq_length=args.max_seq_length,
        progress_callback=pbar.update if pbar else None,
    )
    if pbar is not None:
        pbar.close()
    test_ppl = math.exp(test_loss)
    rprint(f"Test loss {test_loss:.3f}, Test ppl {test_ppl:.3f}.")
    folder = Path(args.adapter_path) if args.adapter_path else None
    if rank == 0 and folder is not None and folder.is_dir():
        row = {"type": "test", "test_loss": test_loss, "test_ppl": test_ppl}
        if iteration is not None:
            row["iteration"] = iteration
        try:
            append_metrics(folder, row)
        except OSError as e:  # a read-only adapter folder: the result is printed
            rprint(
                f"Warning: cannot add the test result to {folder / METRICS_NAME} "
                f"({e.strerror})"
            )
    return test_loss


def run(args, training_callback=None) -> None:
    """Load, train and/or test as the resolved options ``args`` say (mlx_lm.lora.run)."""
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    np.random.seed(args.seed)
    try:
        reporting = get_reporting_callbacks(
            args.report_to,
            project_name=args.project_name,
            log_dir=args.adapter_path,
            config=_json_safe(vars(args)),
        )
    except (ValueError, ImportError) as e:
        raise UsageError(f"--report-to {args.report_to}: {e}") from None
    training_callback = Callbacks(reporting, training_callback)

    if args.train and mx.distributed.init().rank() == 0:  # before the work: one line
        check_adapter_folder(args.adapter_path, args.resume, args.overwrite)
    if args.resume_adapter_file and not Path(args.resume_adapter_file).is_file():
        raise UsageError(f"--resume-adapter-file {args.resume_adapter_file}: not found")
    if args.quickstart:
        rprint(QUICKSTART_NOTE)
    rprint("Loading pretrained model")
    if args.adapter_path and (args.resume or not args.train):
        check_base_gguf(args.adapter_path, args.model)  # same GGUF it was trained on
    model, tokenizer = load_model(args)
    rprint("Loading datasets")
    train_set, valid_set, test_set = load_datasets(args, tokenizer)

    iteration = None
    if args.train:
        rprint("Training")
        iteration = train_model(
            args, model, train_set, valid_set, training_callback, tokenizer
        )
    elif args.adapter_path:
        load_adapter(model, args.adapter_path)
    if args.test:
        rprint("Testing")
        evaluate_model(args, model, test_set, iteration)


def main(argv: list[str] | None = None) -> None:
    """The ``mlx_braces.train`` command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    cli = vars(build_parser().parse_args(argv))
    try:
        args = resolve_args(cli)
        if args.config:
            rprint("Loading configuration file", args.config)
        run(args)
    except TrainingInterrupted as e:
        rprint(
            f"Interrupted after iteration {e.iteration}: checkpoint saved in "
            f"{e.adapter_path}; run the same command with --resume to continue."
        )
        sys.exit(130)
    except KeyboardInterrupt:
        rprint("Interrupted.")
        sys.exit(130)
    except (UsageError, DataError, AdapterError, TrainingError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
