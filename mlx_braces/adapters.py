"""Braces adapters and training checkpoints on disk: the one I/O module.

An adapter folder has mlx-lm's layout, ``adapter_config.json`` and
``adapters.safetensors``; training adds numbered weights, ``resume.safetensors`` and
``metrics.jsonl``. The config says ``fine_tune_type: "braces"`` and carries no
``lora_parameters``, so stock mlx-lm refuses it before touching the model. Only
safetensors and JSON are read and written; files are replaced through
:func:`mlx_braces.commit.commit` (atomically, a set at once), and every problem is
one :class:`AdapterError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.tuner.callbacks import TrainingCallback

from . import commit
from ._version import __version__
from .braces import DEFAULT_GATE_INIT, apply_braces, braced_layers
from .steering import (
    SteeringError,
    attribute_config,
    check_attributes,
    install_attributes,
)

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
RESUME_NAME = "resume.safetensors"
METRICS_NAME = "metrics.jsonl"
_RESUME_KEY = "mlx_braces_resume"  # safetensors metadata key of the resume state


class AdapterError(ValueError):
    """An adapter or checkpoint that does not fit, or cannot be read or written."""


# ---------------------------------------------------------------------------
# The config


@dataclass
class BracesConfig:
    """What ``adapter_config.json`` records of a model's braces (mlx-lm's
    ``lora_parameters``, PEFT's ``LoraConfig``): enough to brace a base again."""

    rank: int
    layers: list[str]  # paths of the braced FFNs, e.g. "model.layers.1.mlp"
    ffn_dims: list[int] | None = None  # d_ff per layer (None: saved before it)
    experts: list[int] | None = None  # routed experts per layer, 0: dense (None: all)
    gate_init: float | None = None  # None: apply_braces' default
    attributes: dict[str, list[str]] | None = None  # attribute name: its words
    hidden_dims: int | None = None  # the attribute MLP's width
    contrast: bool = False  # attribute labels contrast with each other
    steer_only: bool = False  # generate without the unconditioned r(x)
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_model(cls, model: nn.Module) -> BracesConfig:
        """The config of ``model``'s braces; AdapterError if it has none."""
        layers = braced_layers(model)
        if not layers:
            raise AdapterError("Model has no braced layers: call apply_braces first.")
        first = layers[0][1]
        attr = attribute_config(model)  # {} without attributes
        params = attr.get("attribute_parameters", {})
        return cls(
            rank=first.rank,
            layers=[p for p, _ in layers],
            # d_ff per layer: R (rank, d) alone cannot tell bases of equal width apart
            ffn_dims=[m.hidden_dims for _, m in layers],
            # R and gate have a dense FFN's shapes: only this tells an MoE base apart
            experts=[m.num_experts for _, m in layers]
            if any(m.num_experts for _, m in layers)
            else None,
            gate_init=getattr(first, "gate_init", None),
            attributes=attr.get("attributes"),
            hidden_dims=params.get("hidden_dims"),
            contrast=bool(params.get("contrast", False)),
            steer_only=bool(params.get("steer_only", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The braces fields of ``adapter_config.json``."""
        params: dict[str, Any] = {
            "rank": self.rank,
            "gate_init": self.gate_init,
            "layers": list(self.layers),
        }
        if self.ffn_dims is not None:
            params["ffn_dims"] = list(self.ffn_dims)
        if self.experts is not None:
            params["experts"] = list(self.experts)
        out: dict[str, Any] = {
            "fine_tune_type": "braces",
            "format_version": self.format_version,
            "mlx_braces_version": __version__,
            "num_layers": self.num_layers,
            "braces_parameters": params,
        }
        if self.attributes is not None:
            out["attributes"] = {k: list(v) for k, v in self.attributes.items()}
            out["attribute_parameters"] = {
                "hidden_dims": self.hidden_dims,
                "contrast": self.contrast,
                "steer_only": self.steer_only,
            }
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any], file: str | Path) -> BracesConfig:
        """Check a braces adapter config's fields (errors name ``file``); read them."""
        kind = config.get("fine_tune_type")
        if kind != "braces":
            raise AdapterError(f"{file}: fine_tune_type is {kind!r}, not 'braces'")
        version = config.get("format_version")
        if not isinstance(version, int):
            raise AdapterError(
                f"{file}: field 'format_version' missing or not an integer"
            )
        if version > FORMAT_VERSION:
            raise AdapterError(
                f"{file}: format_version {version} is newer than this mlx_braces "
                f"({__version__}) reads ({FORMAT_VERSION}); upgrade mlx-braces"
            )
        params = config.get("braces_parameters")
        if not isinstance(params, dict):
            raise AdapterError(f"{file}: field 'braces_parameters' missing")
        rank = params.get("rank")
        if not isinstance(rank, int) or rank <= 0:
            raise AdapterError(
                f"{file}: braces_parameters.rank must be a positive integer, got "
                f"{rank!r}"
            )
        layers = params.get("layers")
        if (
            not isinstance(layers, list)
            or not layers
            or not all(isinstance(p, str) for p in layers)
        ):
            raise AdapterError(
                f"{file}: braces_parameters.layers must be a non-empty list"
            )
        ffn_dims = params.get("ffn_dims")  # absent from adapters saved before it
        if ffn_dims is not None and (
            not isinstance(ffn_dims, list)
            or len(ffn_dims) != len(layers)
            or not all(isinstance(n, int) for n in ffn_dims)
        ):
            raise AdapterError(
                f"{file}: braces_parameters.ffn_dims must list one integer per layer "
                f"({len(layers)}), got {ffn_dims!r}"
            )
        experts = params.get("experts")  # absent: every layer dense
        if experts is not None and (
            not isinstance(experts, list)
            or len(experts) != len(layers)
            or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for n in experts
            )
        ):
            raise AdapterError(
                f"{file}: braces_parameters.experts must list one integer >= 0 per "
                f"layer ({len(layers)}; 0 for a dense FFN), got {experts!r}"
            )
        attributes = config.get("attributes")
        hidden = contrast = None
        steer_only = False
        if attributes is not None:
            try:
                check_attributes(attributes, f"{file}: field 'attributes'")
            except SteeringError as e:
                raise AdapterError(str(e)) from None
            attr = config.get("attribute_parameters")
            hidden = attr.get("hidden_dims") if isinstance(attr, dict) else None
            if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
                raise AdapterError(
                    f"{file}: attribute_parameters.hidden_dims must be a positive "
                    f"integer, got {hidden!r}"
                )
            contrast = attr.get("contrast", False)
            steer_only = attr.get("steer_only", False)  # absent before it existed
            if not isinstance(steer_only, bool):
                raise AdapterError(
                    f"{file}: attribute_parameters.steer_only must be true or false, "
                    f"got {steer_only!r}"
                )
        return cls(
            rank=rank,
            layers=list(layers),
            ffn_dims=ffn_dims,
            experts=experts,
            gate_init=params.get("gate_init"),
            attributes=attributes,
            hidden_dims=hidden,
            contrast=bool(contrast),
            steer_only=steer_only,
            format_version=version,
        )


def adapter_config(model: nn.Module, /, **extra: Any) -> dict[str, Any]:
    """The whole ``adapter_config.json`` of ``model``: ``extra`` fields (model,
    training settings) plus the braces fields, which always describe ``model``."""
    extra.pop("lora_parameters", None)  # never mlx-lm's: it must refuse the folder
    return {**extra, **BracesConfig.from_model(model).to_dict()}


# ---------------------------------------------------------------------------
# Writing


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Every braces parameter of ``model`` (not the frozen base FFN), by full path."""
    params = {}
    for path, braced in braced_layers(model):
        for k, v in tree_flatten(braced.parameters()):
            if not k.startswith("ffn."):
                params[f"{path}.{k}"] = v
    return params


def write_weights(model: nn.Module) -> commit.Writer:
    """A writer of ``model``'s braces parameters (safetensors) to the path it is given."""
    weights = adapter_parameters(model)
    mx.eval(weights)
    meta = {"format": "mlx", "fine_tune_type": "braces"}
    return lambda tmp: mx.save_safetensors(str(tmp), weights, metadata=meta)


def write_config(config: dict[str, Any]) -> commit.Writer:
    """A writer of an adapter config (sorted, indented JSON) to the path it is given."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dict(sorted(config.items())), f, indent=4, default=str)

    return write


def write_resume(
    model: nn.Module, optimizer, grad_accum, state: dict[str, Any]
) -> commit.Writer:
    """A writer of one safetensors file with everything a resume needs: the braces,
    the optimizer state, a partial gradient sum and ``state`` (JSON metadata)."""
    arrays = {f"adapter.{k}": v for k, v in adapter_parameters(model).items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    if grad_accum is not None:
        arrays.update({f"grad_accum.{k}": v for k, v in tree_flatten(grad_accum)})
    mx.eval(arrays)
    meta = {_RESUME_KEY: json.dumps(state), "format": "mlx"}
    return lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=meta)


def save_weights(model: nn.Module, file: str | Path) -> None:
    """Atomically write ``model``'s braces parameters to a safetensors ``file``."""
    file = Path(file)
    _commit(file.parent, {file.name: write_weights(model)})


def save_config(config: dict[str, Any], file: str | Path) -> None:
    """Atomically write an adapter config (sorted, indented JSON)."""
    file = Path(file)
    _commit(file.parent, {file.name: write_config(config)})


def save_adapter(model: nn.Module, adapter_path: str | Path, /, **config: Any) -> Path:
    """Save ``model``'s braces to ``adapter_path`` (config + weights); returns the folder.

    Extra keyword arguments (e.g. ``model="mlx-community/..."``, training settings) are
    recorded in the config; the braces fields always describe ``model`` itself.
    """
    adapter_path = _folder_arg(adapter_path)
    if isinstance(config.get("model"), str) and "base_gguf_sha256" not in config:
        from .models import model_record

        config.update(model_record(config["model"]))  # a GGUF base: its sha256
    files = {  # config and weights replaced together: a kill leaves old or new
        CONFIG_NAME: write_config(adapter_config(model, **config)),
        WEIGHTS_NAME: write_weights(model),
    }
    _commit(adapter_path, files)
    return adapter_path


def _commit(folder: Path, files: dict[str, commit.Writer]) -> None:
    """:func:`commit.commit`, with an unreadable journal as an AdapterError."""
    try:
        commit.commit(folder, files)
    except commit.CommitError as e:
        raise AdapterError(str(e)) from None


def checkpoint_name(iteration: int) -> str:
    """The numbered weights file of a checkpoint: ``0000100_adapters.safetensors``."""
    return f"{iteration:07d}_{WEIGHTS_NAME}"


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer,
    grad_accum,
    state: dict[str, Any],
    weights: Sequence[str],
    metrics: MetricsWriter,
    config: dict[str, Any],
) -> None:
    """Commit one training checkpoint whole: the ``weights`` files, the resume state
    and, at the run's first checkpoint, ``config`` and the metrics so far.

    ``state`` is the loop's resume state (JSON; ``state["iteration"]`` tags the
    commit). AdapterError if it cannot be written; the folder then keeps its
    previous set (or the journal completes the new one).
    """
    write = write_weights(model)
    files = {name: write for name in weights}
    files[RESUME_NAME] = write_resume(model, optimizer, grad_accum, state)
    if metrics.pending is not None:  # this run's first checkpoint
        files[CONFIG_NAME] = write_config(config)
        files[METRICS_NAME] = metrics.writer()
    it = state["iteration"]
    try:
        commit.commit(folder, files, tag=str(it))
    except (OSError, RuntimeError) as e:  # MLX: RuntimeError on a full disk
        raise AdapterError(_save_failed(folder, it, e)) from None
    metrics.committed()


def _save_failed(folder: Path, it: int, error: Exception) -> str:
    """One line for a checkpoint that could not be written (disk full, read-only)."""
    why = getattr(error, "strerror", None) or " ".join(str(error).split())
    with contextlib.suppress(OSError):
        why += f"; {shutil.disk_usage(folder).free:,} bytes free on that disk"
    committed = False
    with contextlib.suppress(commit.CommitError):
        committed = commit.journal(folder) is not None
    kept = (
        "it is recorded in the folder's commit journal, and the next run there "
        "completes it"
        if committed
        else "the folder's previous contents are unchanged"
    )
    return f"cannot save the checkpoint of iteration {it} in {folder} ({why}); {kept}"


class MetricsWriter(TrainingCallback):
    """Appends every report to ``metrics.jsonl`` (mlx-lm's keys plus ``type``).

    Until the run's first checkpoint the reports are kept in memory: that checkpoint
    replaces the file (``writer()``), so a run that fails before it leaves the old
    file as it was. On resume, entries past the checkpoint's iteration (logged by
    the interrupted run after its last save) are dropped so the file reads as one run.
    """

    def __init__(self, folder: str | Path, start: int, resume: bool):
        self.file = Path(folder) / METRICS_NAME
        self.pending: list[str] | None = []  # None once the file is this run's
        current = _resolve(self.file)
        if resume and current.is_file():
            with open(current) as f:
                for line in f:
                    with contextlib.suppress(ValueError, AttributeError):
                        if json.loads(line).get("iteration", 0) <= start:
                            self.pending.append(line)

    def writer(self) -> commit.Writer:
        """For the first checkpoint's commit: writes the file as this run has it."""
        text = "".join(self.pending or [])
        return lambda tmp: Path(tmp).write_text(text)

    def committed(self) -> None:
        """The file is this run's now: append to it from here on."""
        self.pending = None

    def write(self, kind: str, info: dict[str, Any]) -> None:
        row = {"type": kind}
        for k, v in info.items():
            row[k] = v.item() if isinstance(v, mx.array) else v
        if self.pending is not None:
            self.pending.append(json.dumps(row) + "\n")
            return
        append_metrics(self.file.parent, row)

    def on_train_loss_report(self, train_info: dict):
        self.write("train", train_info)

    def on_val_loss_report(self, val_info: dict):
        self.write("val", val_info)


def append_metrics(folder: str | Path, row: dict[str, Any]) -> None:
    """Append one report to the folder's ``metrics.jsonl`` (appending loses nothing)."""
    with open(_resolve(Path(folder) / METRICS_NAME), "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------
# Reading and checking


def _resolve(file: Path) -> Path:
    """The file holding ``file``'s name in its folder's current set (commit journal)."""
    try:
        return commit.resolve(file.parent, file.name)
    except commit.CommitError as e:
        raise AdapterError(str(e)) from None


def _folder_arg(adapter_path: Any) -> Path:
    """``adapter_path`` as a Path; AdapterError for what cannot be a folder path."""
    if not isinstance(adapter_path, (str, os.PathLike)) or not str(adapter_path):
        raise AdapterError(
            f"adapter_path must be a folder path (str or os.PathLike), got "
            f"{adapter_path!r}"
        )
    path = Path(adapter_path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"{path}: is a file, not an adapter folder")
    return path


def _model_arg(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise AdapterError(
            f"model must be an mlx.nn.Module (an mlx-lm model), got "
            f"{type(model).__name__}"
        )


def read_config(adapter_path: str | Path) -> dict[str, Any]:
    """Read an adapter folder's config as a JSON object; errors name the file."""
    folder = _folder_arg(adapter_path)
    file = folder / CONFIG_NAME
    current = _resolve(file)  # through a cut commit's journal
    if not current.is_file():
        raise AdapterError(f"{file}: not found (is {adapter_path} an adapter folder?)")
    try:
        with open(current) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    except OSError as e:
        raise AdapterError(f"{file}: cannot read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return config


def _read_weights(file: Path) -> dict[str, mx.array]:
    """The tensors of a safetensors ``file`` (never another format), evaluated."""
    current = _resolve(file)  # through a cut commit's journal
    if not current.is_file():
        raise AdapterError(f"{file}: not found")
    try:
        weights = mx.load(str(current), format="safetensors")
        mx.eval(weights)
    except (RuntimeError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read ({e})") from None
    return weights


def _check_weights(
    model: nn.Module,
    weights: dict[str, mx.array],
    file: Path,
    config_file: Path | None = None,
) -> None:
    """Raise AdapterError unless ``weights`` are exactly ``model``'s braces tensors,
    finite, with orthonormal R: the one check of every braces weights file read.

    ``config_file`` is the adapter config ``model`` was braced from (load_adapter);
    None: ``model`` carries this training run's braces (a resume), and mismatches
    say which option to keep the same.
    """
    run = config_file is None
    lists = "this run has" if run else f"{config_file} lists"
    records = "this run has" if run else f"{config_file} records"

    def fail(message: str, option: str = "") -> AdapterError:
        if run and option:
            message += f"; use the same {option} as the run that wrote it"
        return AdapterError(message)

    expected = adapter_parameters(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    attributes = attribute_config(model).get("attributes")
    has_cond = any(".cond." in k for k in weights)
    if missing and not has_cond and attributes is not None:
        raise fail(
            f"{file}: {lists} attributes {', '.join(attributes)} but the weights "
            f"have no attribute tensors (e.g. {missing[0]})",
            "--attributes",
        )
    if missing:
        raise fail(
            f"{file}: missing {len(missing)} tensor(s) "
            f"{'this run' if run else 'the base model'} needs, e.g. {missing[0]}",
            "--num-layers and model",
        )
    if extra and attributes is None and any(".cond." in k for k in extra):
        raise fail(
            f"{file}: has attribute tensors (e.g. {extra[0]}) but {lists} no "
            "'attributes'",
            "--attributes",
        )
    if extra:
        raise fail(
            f"{file}: {len(extra)} tensor(s) "
            f"{'this run' if run else 'the base model'} has no place for, "
            f"e.g. {extra[0]}",
            "--num-layers and model",
        )
    for name, w in weights.items():
        want = expected[name].shape
        if name.endswith(".cond.e") and w.shape != want:
            raise fail(
                f"{file}: {name} has shape {tuple(w.shape)}, but {lists} "
                f"{want[0]} attribute(s) of width {want[1]}: expected {tuple(want)}",
                "--attributes",
            )
        if name.endswith(".R") and w.shape != want and w.shape[1:] == want[1:]:
            raise fail(  # R is (rank, d): only the rank differs
                f"{file}: {name} has rank {w.shape[0]} (shape {tuple(w.shape)}) "
                f"but {records} rank {want[0]}",
                "--rank and model",
            )
        if w.shape != want:
            raise fail(
                f"{file}: {name} has shape {tuple(w.shape)}, "
                + (
                    f"this run's is {tuple(want)}"
                    if run
                    else f"the base model expects {tuple(want)} (wrong base model "
                    "or rank?)"
                ),
                "--rank and model",
            )
        if not mx.all(mx.isfinite(w)).item():
            raise fail(f"{file}: {name} contains NaN or inf")
        if name.endswith(".R"):  # training keeps max |R Rᵀ - I| < 1e-4
            R = w.astype(mx.float32)
            err = mx.abs(R @ R.T - mx.eye(R.shape[0])).max().item()
            if err > 1e-3:
                raise fail(
                    f"{file}: {name} rows are not orthonormal (max |R Rᵀ - I| = "
                    f"{err:.2g}); the file is corrupted or was not saved by mlx_braces"
                )


def _brace_like(model: nn.Module, config: BracesConfig, file: Path) -> None:
    """Brace ``model`` with the layers and rank that ``config`` records."""
    want = config.layers
    try:
        apply_braces(
            model,
            rank=config.rank,
            num_layers=config.num_layers,
            gate_init=(
                DEFAULT_GATE_INIT if config.gate_init is None else config.gate_init
            ),
        )
    except ValueError as e:
        raise AdapterError(
            f"{file}: adapter does not fit this base model: {e}"
        ) from None
    have = [p for p, _ in braced_layers(model)]
    recorded = config.experts or [0] * len(want)
    actual = [m.num_experts for _, m in braced_layers(model)]
    if len(actual) == len(recorded) and actual != recorded:
        i = next(i for i, (a, b) in enumerate(zip(recorded, actual)) if a != b)
        raise AdapterError(
            f"{file}: adapter was trained on a base model whose {want[i]} is "
            f"{_ffn_kind(recorded[i])}, this one's {have[i]} is "
            f"{_ffn_kind(actual[i])} (wrong base model?)"
        )
    if have != want:
        raise AdapterError(
            f"{file}: adapter braces layers {want[0]}..{want[-1]} ({len(want)}) but "
            f"this base model's last {config.num_layers} FFNs are "
            f"{have[0]}..{have[-1]}"
        )
    recorded = config.ffn_dims  # absent from adapters saved before it
    actual = [m.hidden_dims for _, m in braced_layers(model)]
    if recorded is not None and recorded != actual:
        i = next((i for i, (a, b) in enumerate(zip(recorded, actual)) if a != b), 0)
        raise AdapterError(
            f"{file}: adapter was trained on a base model whose {want[i]} has FFN "
            f"width {recorded[i]}, this one has {actual[i]} (wrong base model?)"
        )
    if config.attributes is not None:  # conditional branches, filled by weights
        install_attributes(
            model,
            config.attributes,
            hidden_dims=config.hidden_dims,
            contrast=config.contrast,
            steer_only=config.steer_only,
        )


def _ffn_kind(experts: int) -> str:
    return "a dense FFN" if experts == 0 else f"a mixture of {experts} experts"


def load_adapter(
    model: nn.Module, adapter_path: str | Path, weights: str | None = None
) -> nn.Module:
    """Brace ``model`` as the adapter says and load its weights, checking every tensor.

    ``weights`` picks a file inside the folder (e.g. a numbered checkpoint).
    Raises :class:`AdapterError` naming the file and what differs.
    """
    _model_arg(model)
    adapter_path = _folder_arg(adapter_path)
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise AdapterError(
            f"weights must be a file name in {adapter_path}, got {weights!r}"
        )
    config_file = adapter_path / CONFIG_NAME
    file = adapter_path / (weights or WEIGHTS_NAME)
    names = (CONFIG_NAME, file.name)
    for _ in range(5):  # a checkpoint committed while we read: read both again
        seen = commit.snapshot(adapter_path, names)
        config = BracesConfig.from_dict(read_config(adapter_path), config_file)
        loaded = _read_weights(file)
        if commit.snapshot(adapter_path, names) == seen:
            break
    _brace_like(model, config, config_file)
    _check_weights(model, loaded, file, config_file)
    model.load_weights(list(loaded.items()), strict=False)
    model.eval()
    return model


def load_weights_file(model: nn.Module, file: str | Path) -> None:
    """Load braces weights from a safetensors ``file`` into a braced ``model``
    (``--resume-adapter-file``), with load_adapter's checks."""
    file = Path(file)
    weights = _read_weights(file)
    _check_weights(model, weights, file)
    model.load_weights(list(weights.items()), strict=False)


def load_resume(model: nn.Module, optimizer, folder: str | Path):
    """Restore weights and optimizer state from ``folder``'s resume checkpoint.

    Returns ``(state, grad_accum)``: the loop's state as :func:`save_checkpoint`
    recorded it, and the partial gradient sum (None if there was none).
    """
    file = _resolve(Path(folder) / RESUME_NAME)  # the current one, if a commit was cut
    if not file.is_file():
        raise _nothing_to_resume(file)
    try:
        arrays, meta = mx.load(str(file), return_metadata=True)
        state = json.loads(meta[_RESUME_KEY])
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{file}: not a resume checkpoint ({e})") from None

    def part(prefix):
        n = len(prefix)
        return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix)}

    weights = part("adapter.")
    _check_weights(model, weights, file)
    model.load_weights(list(weights.items()), strict=False)

    saved = part("optimizer.")
    optimizer.init(model.trainable_parameters())
    have = dict(tree_flatten(optimizer.state))
    if set(have) != set(saved) or any(have[k].shape != saved[k].shape for k in have):
        raise AdapterError(
            f"{file}: its optimizer state does not fit this run's optimizer "
            f"({type(optimizer).__name__}); resume with the same --optimizer"
        )
    optimizer.state = tree_map_with_path(lambda p, _: saved[p], optimizer.state)

    grads = part("grad_accum.")
    grad_accum = None
    if grads:
        grad_accum = tree_map_with_path(
            lambda p, _: grads[p], model.trainable_parameters()
        )
    return state, grad_accum


def _nothing_to_resume(file: Path) -> AdapterError:
    return AdapterError(
        f"{file}: not found, nothing to resume (train once without --resume, or "
        "point --adapter-path at the folder of the run to continue)"
    )


def check_adapter_folder(
    folder: str | Path, resume: bool = False, overwrite: bool = False
) -> None:
    """Refuse, before any work, an adapter folder training cannot use or would damage.

    It must be a writable folder (created if missing); with ``resume`` it must hold a
    resume checkpoint; an adapter of another kind (e.g. mlx-lm LoRA) in it is only
    replaced with ``overwrite``. Raises AdapterError naming the path.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapterError(
            f"{folder}: is a file, not a folder (the adapter path names a folder)"
        )
    if resume and not _resolve(folder / RESUME_NAME).is_file():
        raise _nothing_to_resume(folder / RESUME_NAME)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        commit.temp_path(folder, "write_test.tmp").unlink()
    except OSError as e:
        raise AdapterError(
            f"{folder}: cannot write there ({e.strerror or e}); choose another "
            "--adapter-path"
        ) from None
    config = _resolve(folder / CONFIG_NAME)
    if overwrite or resume:
        return
    if config.is_file():
        try:
            kind = json.loads(config.read_text()).get("fine_tune_type")
        except (ValueError, UnicodeDecodeError, AttributeError):
            kind = "unreadable"
        if kind != "braces":
            raise AdapterError(
                f"{folder / CONFIG_NAME}: the folder holds a {kind} adapter, not "
                "braces; training would replace it: pass --overwrite, or choose "
                "another --adapter-path"
            )
    elif _resolve(folder / WEIGHTS_NAME).is_file():
        raise AdapterError(
            f"{folder / WEIGHTS_NAME}: an adapter without {CONFIG_NAME} (not one "
            "mlx_braces wrote); training would replace it: pass --overwrite, or "
            "choose another --adapter-path"
        )


def is_braces_adapter(adapter_path: str | Path) -> bool:
    """True if ``adapter_path`` holds a braces adapter config.

    A config with braces fields but another ``fine_tune_type`` is an error, not LoRA.
    """
    config = read_config(adapter_path)
    kind = config.get("fine_tune_type")
    if kind != "braces" and "braces_parameters" in config:
        raise AdapterError(
            f"{Path(adapter_path) / CONFIG_NAME}: has braces_parameters but "
            f"fine_tune_type is {kind!r}; expected 'braces'"
        )
    return kind == "braces"


def check_base_gguf(adapter_path: str | Path, model: str | None) -> None:
    """Refuse a base whose GGUF differs from the one the adapter recorded, if both known."""
    from .models import gguf_sha256

    file = Path(adapter_path) / CONFIG_NAME
    if not file.is_file():
        return
    recorded = read_config(adapter_path).get("base_gguf_sha256")
    actual = gguf_sha256(model) if recorded else None
    if actual is not None and actual != recorded:
        raise AdapterError(
            f"{file}: adapter was trained on the GGUF with sha256 {recorded}, but "
            f"{model} is sha256 {actual} (a different base model file)"
        )


def recorded_model(adapter_path: str | Path) -> str | None:
    """The base model an adapter records, usable from any working directory.

    New adapters record a local folder by absolute path; an older adapter's relative
    entry is looked up from here, then inside and beside the adapter folder.
    Hub ids and names come back as recorded.
    """
    model = read_config(adapter_path).get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise AdapterError(
            f"{Path(adapter_path) / CONFIG_NAME}: field 'model' must be a string, got "
            f"{model!r}"
        )
    path = Path(model).expanduser()
    if path.is_absolute() or path.exists():
        return model
    folder = Path(adapter_path).resolve()
    for base in (folder, folder.parent):
        if (base / path).exists():
            return str(base / path)
    return model
