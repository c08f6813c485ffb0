"""Generate text with braces adapters: ``mlx_lm.generate`` with our loader and steering.

The command line is mlx-lm's own (same flags, defaults, streaming and footer): its
``main`` runs unchanged with :func:`mlx_braces.load` in place of ``mlx_lm.load``. Added
flags: ``--attribute NAME --strength S`` (repeatable, paired in order) to steer, and
``--compare`` to print the base model's output before the adapter's. With neither
``--model`` nor ``--adapter-path``, the embedded stories260K model is used, and an
adapter in ``./adapters`` (where ``mlx_braces.train`` saves) is compared against it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import sys
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import mlx.nn as nn

from ._compat import parser_action, swapped
from .adapters import (
    CONFIG_NAME,
    AdapterError,
    check_base_gguf,
    is_braces_adapter,
    load_adapter,
    recorded_model,
)
from .loading import load
from .models import (
    EMBEDDED_MODEL,
    QUICKSTART_DATA,
    QUICKSTART_MODEL,
    QUICKSTART_QUESTION,
)
from .quantize import add_dequantize_argument, fast_dtype

# The module itself: `import mlx_lm.generate` gives the function of that name.
_mlx = importlib.import_module("mlx_lm.generate")

EMBEDDED_PROMPT = "Once upon a time"  # the embedded model writes children's stories
# The quickstart adapter is asked a review it never saw (SST-2 dev, label negative),
# in its training data's form: the base model calls most reviews positive.
QUICKSTART_REVIEW = "unflinchingly bleak and desperate"
QUICKSTART_PROMPT = f"{QUICKSTART_QUESTION}\n\n{QUICKSTART_REVIEW}"
QUICKSTART_MAX_TOKENS = 32
DEFAULT_ADAPTER = "adapters"  # mlx_braces.train's default --adapter-path


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[int],
    steering: Mapping[str, float] | None = None,
    **kwargs,
) -> Generator[Any, None, None]:
    """``mlx_lm.stream_generate``; ``steering`` ({attribute: strength}) holds for this call."""
    with _steering(model, steering):
        yield from _mlx.stream_generate(model, tokenizer, prompt, **kwargs)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[int],
    verbose: bool = False,
    steering: Mapping[str, float] | None = None,
    **kwargs,
) -> str:
    """``mlx_lm.generate``; ``steering`` ({attribute: strength}) holds for this call."""
    with _steering(model, steering):
        return _mlx.generate(model, tokenizer, prompt, verbose=verbose, **kwargs)


def _steering(model: nn.Module, strengths: Mapping[str, float] | None):
    """Steer inside the block and restore after; None leaves the model as it is."""
    if strengths is None:
        return contextlib.nullcontext()
    from .steering import steering

    return steering(model, strengths)


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx-lm's generate parser (every flag and default kept) plus steering flags."""
    parser = _mlx.setup_arg_parser()
    parser.description = "Generate text with an mlx-lm model and a braces adapter."
    parser_action(parser, "model").help = (
        "The path to the local model directory or Hugging Face repo, a named "
        "model (smollm2-135m-instruct, gemma-3-270m, stories260k) or a "
        "FILE.gguf. Default: the base model recorded in the adapter, else the "
        "quickstart's smollm2-135m-instruct."
    )
    # None: resolved in main (see resolve: the quickstart's prompt and length)
    parser_action(parser, "prompt").default = None
    parser_action(parser, "max_tokens").default = None
    parser.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="NAME",
        help="Steer with attribute NAME of the adapter (repeatable).",
    )
    parser.add_argument(
        "--strength",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="Strength of the matching --attribute: > 0 toward it, < 0 away "
        "(repeatable, paired in order; default 1.0 each).",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="Print the base model's output first, then the adapter's.",
    )
    add_dequantize_argument(parser, "Generate with")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the model, adapter, prompt and length not given (quickstart defaults).

    With neither ``--model`` nor ``--adapter-path``: the adapter that
    ``mlx_braces.train`` saves in ``./adapters``, compared with its base (else the
    quickstart's SmolLM2 alone), float32 on a CPU. An adapter trained on the
    quickstart data is asked a held-out review the way it was trained.
    """
    quickstart = args.model is None and args.adapter_path is None
    if quickstart and (Path(DEFAULT_ADAPTER) / CONFIG_NAME).is_file():
        args.adapter_path, args.compare = DEFAULT_ADAPTER, True
    if args.model is None and args.adapter_path is not None:
        args.model = recorded_model(args.adapter_path)
        if not args.model:
            raise AdapterError(
                f"{Path(args.adapter_path) / CONFIG_NAME}: records no base model "
                "(field 'model'); pass --model"
            )
    if args.model is None:
        args.model = QUICKSTART_MODEL
    if quickstart and args.dequantize is None:
        args.dequantize = fast_dtype()
    asked = (
        quickstart
        and args.adapter_path is not None
        and _quickstart_adapter(args.adapter_path)
    )
    if args.max_tokens is None:
        args.max_tokens = QUICKSTART_MAX_TOKENS if asked else _mlx.DEFAULT_MAX_TOKENS
    if args.prompt is None:
        embedded = args.model.lower() == "stories260k" or (
            Path(args.model).resolve() == EMBEDDED_MODEL.resolve()
        )
        args.prompt = (
            EMBEDDED_PROMPT
            if embedded
            else QUICKSTART_PROMPT
            if asked
            else _mlx.DEFAULT_PROMPT
        )
    if quickstart and args.adapter_path is not None:
        what = (
            f"the held-out review {QUICKSTART_REVIEW!r} (label: negative) asked"
            if asked and args.prompt == QUICKSTART_PROMPT
            else f"the prompt {args.prompt!r} continued"
        )
        print(
            f"Quickstart: {what} by {args.model} without, then with, the braces "
            f"adapter in ./{DEFAULT_ADAPTER}:",
            flush=True,
        )
    return args


def _quickstart_adapter(adapter_path: str) -> bool:
    """Whether the adapter was trained on the quickstart's data (its question)."""
    from .adapters import read_config

    data = read_config(adapter_path).get("data")
    return isinstance(data, str) and Path(data).resolve() == QUICKSTART_DATA.resolve()


def apply_adapter(model: nn.Module, adapter_path: str) -> None:
    """Apply a braces (or mlx-lm LoRA/DoRA/full) adapter to a loaded model in place."""
    if is_braces_adapter(adapter_path):
        load_adapter(model, adapter_path)
    else:
        from mlx_lm.tuner.utils import load_adapters

        load_adapters(model, adapter_path)
        model.eval()


class _Parsed:
    """Stands in for mlx-lm's parser inside its ``main``: returns our parsed args."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def parse_args(self, *_, **__) -> argparse.Namespace:
        return self.args


def run_mlx_main(args: argparse.Namespace, loader: Callable[..., Any]) -> None:
    """Run ``mlx_lm.generate.main`` on ``args``, loading models with ``loader``."""
    if not all(hasattr(_mlx, k) for k in ("main", "setup_arg_parser", "load")):
        raise RuntimeError("this mlx-lm's generate module cannot be wrapped")
    calls = []

    def load_through(*a, **k):
        calls.append(a)
        return loader(*a, **k)

    with swapped(_mlx, setup_arg_parser=lambda: _Parsed(args), load=load_through):
        _mlx.main()
    if not calls:
        raise RuntimeError("mlx_lm.generate.main no longer loads through `load`")


def _describe(args: argparse.Namespace, steering: dict[str, float] | None) -> str:
    what = f"with adapter {args.adapter_path}"
    if steering:
        what += ", steering " + ", ".join(f"{k}={v:+g}" for k, v in steering.items())
    return what


def run(args: argparse.Namespace, steering: dict[str, float] | None = None) -> None:
    """Generate as ``mlx_lm.generate`` does; with ``args.compare``, base model first."""
    models = {}

    def loader(path, adapter_path=None, braced=True, **kwargs):
        kwargs["dequantize"] = getattr(args, "dequantize", None) or False
        if adapter_path is None:  # no adapter, or mlx-lm loading the draft model
            return load(path, **kwargs)
        if not args.compare:
            out = load(path, adapter_path=adapter_path, **kwargs)
        elif not braced:
            out = models["base"] = load(path, **kwargs)
            return out
        else:  # the base model of the first run, with the adapter added
            out = models["base"]
            apply_adapter(out[0], adapter_path)
        if steering:
            from .steering import steer

            steer(out[0], steering)
        return out

    if args.compare and args.adapter_path is not None:  # before loading the base
        check_base_gguf(args.adapter_path, args.model)
    if not args.compare:
        run_mlx_main(args, loader)
        return
    prompt = sys.stdin.read() if args.prompt == "-" else None
    for braced in (False, True):
        what = _describe(args, steering) if braced else "base model"
        print(f"--- {args.model}, {what}", flush=True)
        if prompt is not None:
            sys.stdin = io.StringIO(prompt)  # mlx-lm reads `-p -` from stdin each run
        run_mlx_main(args, functools.partial(loader, braced=braced))


def main(argv: list[str] | None = None) -> None:
    """``mlx_braces.generate`` on the command line (``argv``: sys.argv[1:] if None)."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if len(args.strength) not in (0, len(args.attribute)):
        parser.error(
            f"--attribute and --strength come in pairs: got {len(args.attribute)} "
            f"--attribute and {len(args.strength)} --strength"
        )
    if len(set(args.attribute)) != len(args.attribute):
        parser.error(f"an attribute is given twice: {', '.join(args.attribute)}")
    strengths = args.strength or [1.0] * len(args.attribute)
    steering = dict(zip(args.attribute, strengths)) or None
    stdin = sys.stdin
    try:
        resolve(args)
        if (steering or args.compare) and args.adapter_path is None:
            flag = "--compare" if args.compare else "--attribute"
            parser.error(f"{flag} needs an adapter (--adapter-path)")
        run(args, steering)
    except ValueError as e:  # our errors (subclasses); mlx-lm's keep their traceback
        if type(e) is ValueError:
            raise
        sys.exit(f"Error: {e}")
    finally:
        sys.stdin = stdin


if __name__ == "__main__":
    main()
