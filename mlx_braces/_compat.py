"""The one door to mlx-lm internals: every private name or monkey-patch goes here.

mlx-braces reuses mlx-lm's CLIs, server and training UI rather than copying them,
and some of that reuse touches names mlx-lm does not promise to keep. They are all
here, so that an mlx-lm release that changes one breaks in this file (and in
``tests/test_compat.py``, which checks each name below) and nowhere else.
pyproject pins ``mlx-lm>=0.32,<0.33``: the versions these were checked against.

Touched, and why:

- ``mlx_lm.tuner.trainer._clear_cache(threshold)``: the training loop frees MLX's
  buffer cache exactly as mlx-lm's loop does (``clear_cache``).
- ``mlx_lm.utils._parse_size(text)``: ``--clear-cache-threshold 2GB`` parses as
  ``mlx_lm.lora`` parses it (``parse_size``).
- ``mlx_lm.lora.yaml_loader``: ``-c config.yaml`` reads as ``mlx_lm.lora`` reads it
  (``1e-5`` a float); a module global of mlx-lm's CLI, not API (``yaml_loader``).
- ``mlx_lm.cli_ui.TrainUI``'s ``_console``, ``_progress``, ``_task`` and ``_rank``:
  ``TrainUI`` below keeps mlx-lm's progress bar (terminals only) but prints the
  classic ``Iter N: ...`` lines, so it replaces the bar and reads the console.
- ``mlx_lm.server``: ``main`` runs with ``load``, ``ModelProvider`` and
  ``_run_http_server`` swapped (``serving``) so that braces adapters load and the
  HTTP handler reads per-request steering; ``_run_http_server`` takes the handler
  class as its ``handler_class`` argument.
- ``ModelProvider.model_key``: mlx-lm compares ``(model_path, adapter_path,
  draft_model_path)``; the server appends the steering (``base_model_key``).
- ``mlx_lm.generate``: ``main`` runs with ``setup_arg_parser`` and ``load`` swapped
  (``swapped``), so mlx-lm's own flags, streaming and footer are kept.
- ``mlx_lm.evaluate.load``: swapped so that ``MLXLM`` wraps an already loaded
  (braced) model instead of loading by path (``swapped``).
- ``argparse.ArgumentParser._actions``: edits the help/default of one of mlx-lm's
  generate flags (``parser_action``); argparse has no public lookup by dest.
- ``mlx_lm.models.switch_layers._gather_sort(x, indices)``: a braced MoE block lays
  out its per-token terms in the order ``SwitchGLU``/``SwitchMLP`` sort their tokens
  by expert (``gather_sort``), so they meet the right rows.
- mlx-lm datasets' ``_data`` (``TextDataset``, ``ChatDataset``,
  ``CompletionsDataset``, ``ConcatenatedDataset``, ``CacheDataset``): the raw records
  behind a loaded dataset, for attribute labels and record checks
  (``dataset_data``, ``dataset_records``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from mlx_lm import cli_ui

MLX_LM_VERSIONS = ">=0.32,<0.33"  # the pin in pyproject.toml


def clear_cache(threshold: int) -> None:
    """Free MLX's buffer cache once over ``threshold`` bytes, as mlx-lm's loop does."""
    from mlx_lm.tuner.trainer import _clear_cache

    _clear_cache(threshold)


def gather_sort(x: Any, indices: Any) -> tuple[Any, Any, Any]:
    """``(x sorted by expert, sorted indices, inverse order)``, as mlx-lm's switch
    layers sort their tokens before the gathered matmuls."""
    from mlx_lm.models.switch_layers import _gather_sort

    return _gather_sort(x, indices)


def parse_size(text: str) -> int:
    """Bytes in ``text`` ("1500", "2GB", "512M"), as mlx-lm's CLIs read sizes."""
    from mlx_lm.utils import _parse_size

    return _parse_size(text)


def yaml_loader() -> type:
    """The YAML loader ``mlx_lm.lora`` reads configs with (``1e-5`` is a float)."""
    from mlx_lm.lora import yaml_loader as loader

    return loader


class TrainUI(cli_ui.TrainUI):
    """mlx-lm's progress bar (terminals only) over its classic ``Iter N: ...`` lines."""

    def __init__(self, total_iters: int, rank: int = 0, start: int = 0):
        super().__init__(total_iters, rank)
        show = rank == 0 and self._console.is_terminal
        self._progress = cli_ui.make_train_progress(self._console, disable=not show)
        self._task = self._progress.add_task("train", total=total_iters)
        self._progress.update(self._task, completed=start)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def print(self, text: str) -> None:
        if self._rank == 0:
            self._console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def swapped(module: ModuleType, **names: Any) -> Iterator[None]:
    """``module.NAME = value`` for each of ``names`` inside the block, then restored."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise RuntimeError(
            f"{module.__name__} has no {', '.join(missing)}: this mlx-lm cannot be "
            f"wrapped (mlx-braces needs mlx-lm{MLX_LM_VERSIONS})"
        )
    saved = {n: getattr(module, n) for n in names}
    for n, value in names.items():
        setattr(module, n, value)
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(module, n, value)


@contextlib.contextmanager
def serving(load: Callable, provider: type, handler_class: type) -> Iterator[None]:
    """Inside the block ``mlx_lm.server.main`` uses our loader, provider and handler."""
    import mlx_lm.server as server

    http = functools.partial(server._run_http_server, handler_class=handler_class)
    with swapped(server, load=load, ModelProvider=provider, _run_http_server=http):
        yield


def base_model_key(key: tuple) -> tuple:
    """The part of a ``ModelProvider.model_key`` that mlx-lm itself compares."""
    return key[:3]  # (model_path, adapter_path, draft_model_path)


def parser_action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    """The action of ``parser`` that stores ``dest``, to change its help or default."""
    for action in parser._actions:
        if action.dest == dest:
            return action
    raise RuntimeError(f"{parser.prog}: no option stores {dest!r}")


def dataset_data(dataset: Any) -> Any:
    """What an mlx-lm dataset wraps (records or another dataset); None if nothing."""
    return getattr(dataset, "_data", None)


def dataset_records(dataset: Any) -> Any:
    """The records behind nested mlx-lm datasets: ``CacheDataset`` -> ... -> list."""
    records = dataset
    while not isinstance(records, (list, tuple)) and hasattr(records, "_data"):
        records = records._data
    return records
