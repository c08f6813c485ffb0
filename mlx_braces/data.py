"""Training data: mlx-lm's JSONL formats and Hub datasets, checked before any work.

Every record is checked and tokenized up front (with mlx-lm's own dataset classes), so
bad input fails with one line naming the file and line it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_lm.cli_ui import rprint

from ._compat import dataset_data

FORMATS = (
    'text {"text": ...}, completions {"prompt": ..., "completion": ...}, '
    'chat {"messages": [...]}, tools {"messages": [...], "tools": [...]}'
)


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the file and line."""


def check_batch_size(
    batch_size: int,
    examples: int | None = None,
    workers: int = 1,
    what: str = "Dataset",
    name: str = "batch_size",
) -> None:
    """Raise ValueError unless ``examples`` fill a batch and ``workers`` split it evenly.

    ``what`` names the data and ``name`` the setting in the message (a CLI passes
    its file and ``--batch-size``).
    """
    if examples is not None and examples < batch_size:
        raise ValueError(
            f"{what} has {examples} examples, fewer than {name} {batch_size}"
        )
    if batch_size % workers:
        raise ValueError(
            f"{name} {batch_size} must be divisible by the number of processes "
            f"({workers})"
        )


def read_jsonl(
    file: str | Path,
    error: type[Exception] | None = None,
    name: str | Path | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The JSON objects of a JSONL file, each with where it came from ("FILE line N").

    Blank lines are skipped. A missing file, a line that is not a JSON object, or text
    that is not UTF-8 raises ``error`` (default :class:`DataError`) in one line naming
    ``name`` (default ``file``) and the line.
    """
    error = error or DataError
    name = file if name is None else name
    rows = []
    try:
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(
                        f"{name} line {n}: not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(record, dict):
                    raise error(
                        f"{name} line {n}: expected a JSON object, got "
                        f"{type(record).__name__}"
                    )
                rows.append((f"{name} line {n}", record))
    except FileNotFoundError:
        raise error(f"{name}: not found") from None
    except UnicodeDecodeError as e:
        raise error(f"{name}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise error(f"{name}: cannot read ({e.strerror})") from None
    return rows


def _records(file: Path) -> tuple[list[dict], list[str]]:
    """Records of a JSONL data file and where each came from."""
    rows = read_jsonl(file)
    return [r for _, r in rows], [w for w, _ in rows]


def _data_format(sample: dict, args) -> str | None:
    """The mlx-lm format ``create_dataset`` will pick for ``sample`` (same order)."""
    if _feature(args, "prompt") in sample and _feature(args, "completion") in sample:
        return "completions"
    if _feature(args, "chat", "messages") in sample:
        return "tools" if "tools" in sample else "chat"
    if _feature(args, "text") in sample:
        return "text"
    return None


def _feature(args, name: str, default: str | None = None) -> str:
    return getattr(args, f"{name}_feature", None) or default or name


def _check_records(records: list, where: list[str], args) -> str:
    """Every record has the keys and types of the format its first record sets."""
    fmt = _data_format(records[0], args)
    if fmt is None:
        raise DataError(
            f"{where[0]}: no mlx-lm data format fits its keys "
            f"({', '.join(map(repr, records[0])) or 'none'}); expected one of: {FORMATS}"
        )
    if fmt == "completions":
        keys = {_feature(args, "prompt"): str, _feature(args, "completion"): str}
    elif fmt == "text":
        keys = {_feature(args, "text"): str}
    else:
        keys = {_feature(args, "chat", "messages"): list}
    for record, w in zip(records, where):
        missing = [k for k in keys if k not in record]
        if missing:
            raise DataError(
                f"{w}: missing key {', '.join(map(repr, missing))} (found "
                f"{', '.join(map(repr, record)) or 'no keys'}); {where[0]} made this a "
                f"{fmt} dataset. Formats: {FORMATS}"
            )
        for k, t in keys.items():
            if not isinstance(record[k], t):
                raise DataError(
                    f"{w}: '{k}' must be a {'string' if t is str else 'list'}, got "
                    f"{type(record[k]).__name__}"
                )
        if fmt in ("chat", "tools"):
            for m in record[next(iter(keys))]:
                if not isinstance(m, dict) or "role" not in m:
                    raise DataError(
                        f"{w}: every message must be an object with 'role' and "
                        f"'content', got {json.dumps(m)[:80]}"
                    )
    return fmt


def _load_split(records, where, label: str, args, tokenizer, model_name: str):
    """Check, build (mlx-lm's create_dataset) and tokenize one split."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    fmt = _check_records(records, where, args)
    if fmt != "text" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{label} is a {fmt} dataset, which mlx-lm formats with the tokenizer's "
            f"chat template, but the tokenizer of {model_name} has none; use a text "
            'dataset ({"text": ...}) or a model with a chat template'
        )
    try:
        dataset = create_dataset(records, tokenizer, args)
    except ValueError as e:  # --mask-prompt on a text dataset
        raise DataError(f"{label}: {e} Use a completions or chat dataset.") from None
    dataset = CacheDataset(dataset)
    lengths = []
    for i, w in enumerate(where):
        try:
            tokens, offset = dataset[i]
        except Exception as e:  # the tokenizer or chat template rejects a record
            raise DataError(f"{w}: cannot tokenize ({type(e).__name__}: {e})") from None
        lengths.append((len(tokens), offset))
    long = [n for n, _ in lengths if n > args.max_seq_length]
    if long:
        rprint(
            f"Warning: {len(long)} of {len(lengths)} examples in {label} are longer "
            f"than --max-seq-length {args.max_seq_length} tokens (longest {max(long)});"
            " they will be truncated."
        )
    if args.mask_prompt:
        empty = sum(o >= min(n, args.max_seq_length) - 1 for n, o in lengths)
        if empty:
            rprint(
                f"Warning: {empty} examples in {label} have no completion tokens left "
                "to train on (prompt at least --max-seq-length long)."
            )
    return dataset


def load_datasets(args, tokenizer) -> tuple[Any, Any, Any]:
    """(train, valid, test) from --data: a folder of JSONL files or a Hub dataset.

    Uses mlx-lm's dataset classes; every record is checked and tokenized up front so
    that bad input fails before training with the file and line it came from.
    """
    from .models import EMBEDDED_DATA, is_local_path  # (not at import: see __init__)

    data = args.data or str(EMBEDDED_DATA)
    model_name = args.model or "the embedded model"
    names = ("train", "valid", "test")
    splits: dict[str, tuple[list, list[str]]] = {}
    if getattr(args, "hf_dataset", None):  # mlx-lm's YAML-only Hub datasets, as is
        from mlx_lm.tuner.datasets import CacheDataset, load_custom_hf_dataset

        datasets = load_custom_hf_dataset(args, tokenizer)
        return tuple(CacheDataset(d) if len(d) else [] for d in datasets)
    if Path(data).expanduser().is_dir():
        folder = Path(data).expanduser()
        for n in names:
            file = folder / f"{n}.jsonl"
            splits[n] = _records(file) if file.is_file() else ([], [])
        label = {n: str(Path(data) / f"{n}.jsonl") for n in names}
    elif is_local_path(data) or Path(data).expanduser().exists():
        raise DataError(
            f"--data {data}: not a folder; expected a folder with train.jsonl, "
            "valid.jsonl (and test.jsonl) or a Hugging Face dataset name"
        )
    else:
        from mlx_lm.tuner.datasets import load_hf_dataset

        rprint(f"Loading Hugging Face dataset {data}.")
        try:
            datasets = load_hf_dataset(data, tokenizer, args)
        except ImportError:
            raise DataError(
                f"--data {data}: not a local folder, and reading Hugging Face datasets "
                "needs the `datasets` package (pip install datasets)"
            ) from None
        except ValueError as e:
            raise DataError(f"--data {data}: {e}") from None
        splits = {
            n: _records_of(d, f"{data} {n} split") for n, d in zip(names, datasets)
        }
        label = {n: f"{data} {n} split" for n in names}

    train_recs, valid_recs, test_recs = (splits[n] for n in names)
    if args.train and not train_recs[0]:
        raise DataError(
            f"{label['train']}: training set not found or empty; --data needs a "
            "train.jsonl with at least --batch-size examples"
        )
    if args.test and not test_recs[0]:
        raise DataError(
            f"{label['test']}: test set not found or empty (needed by --test)"
        )
    out = []
    for n, (records, where) in zip(names, (train_recs, valid_recs, test_recs)):
        needed = (n == "train" and args.train) or (n == "test" and args.test)
        needed = needed or (n == "valid" and args.train)
        if not records or not needed:
            out.append([])
            continue
        ds = _load_split(records, where, label[n], args, tokenizer, model_name)
        try:
            check_batch_size(
                args.batch_size, len(ds), what=label[n], name="--batch-size"
            )
        except ValueError as e:
            raise DataError(str(e)) from None
        out.append(ds)
    if args.train and not out[1]:
        rprint(
            f"Warning: {label['valid']}: validation set not found or empty. "
            "Training will proceed without validation."
        )
    return tuple(out)


def _records_of(dataset, label: str) -> tuple[list, list[str]]:
    """Records behind an mlx-lm dataset (from the Hub), for the same checks."""
    records = list(dataset_data(dataset) or [])
    return records, [f"{label} record {i + 1}" for i in range(len(records))]
