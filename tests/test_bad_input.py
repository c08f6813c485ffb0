"""Bad input, as a new user gives it: every case fails with one clear line (issue 14).

A table of cases across train, generate, evaluate, inspect, plot, server and the
Python API. Each CLI case runs the real ``main`` in-process and asserts a non-zero
exit, no traceback and one line naming what is wrong (argparse's own errors: exit 2,
its usage line, then one error line). Each API case asserts the exception class and
its one-line message.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load

from mlx_braces import (
    AdapterError,
    apply_braces,
    braced_layers,
    load,
    load_adapter,
    save_adapter,
)
from mlx_braces.adapters import CONFIG_NAME, WEIGHTS_NAME
from mlx_braces.commit import locked
from mlx_braces.loading import ModelLoadError
from mlx_braces.steering import SteeringError, steer
from mlx_braces.train import EMBEDDED_DATA, EMBEDDED_MODEL

# Modules, not the package's same-named functions (mlx_braces.generate).
evaluate_cli, generate_cli, inspect_cli, plot_cli, server_cli, train_cli = (
    importlib.import_module(f"mlx_braces.{name}")
    for name in ("evaluate", "generate", "lens", "plot", "server", "train")
)
os.environ["HF_HUB_OFFLINE"] = "1"
OFFLINE_ID = "nobody-here/no-such-model"
# The embedded toy model; with no --model train would fetch SmolLM2 (quickstart).
EMBEDDED = ["--model", "stories260k"]
SST2 = [json.loads(line) for line in open(EMBEDDED_DATA / "train.jsonl")][:8]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the cases point at: data, a good adapter, broken copies of it, ..."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root}
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": r["text"]}) + "\n" for r in SST2)
    )
    w["data"] = data
    good = root / "good"
    argv = [*EMBEDDED, "--data", str(data), "--adapter-path", str(good)]
    argv += ["--rank", "4", "--iters", "2", "--save-every", "2"]
    argv += ["--max-seq-length", "32"]
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        train_cli.main(argv)
    w["good"] = good
    w["file"] = root / "a_file.txt"
    w["file"].write_text("not a folder\n")
    w["folder"] = root / "a_folder"
    w["folder"].mkdir()
    w["empty"] = root / "empty_adapter"
    w["empty"].mkdir()
    metrics = root / "metrics"
    metrics.mkdir()
    w["metrics"] = metrics
    return w


def variant(world, name: str, edit: Callable[[Path], None]) -> Path:
    """A copy of the good adapter, changed by ``edit``."""
    folder = world["root"] / "variants" / name
    if not folder.exists():
        shutil.copytree(world["good"], folder)
        edit(folder)
    return folder


def edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        for k, v in changes.items():
            if v is None:
                config.pop(k, None)
            else:
                config[k] = v
        (folder / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def data_folder(world, name: str, train: list[str] | bytes, **others) -> Path:
    folder = world["root"] / "datasets" / name
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": train, **others}
    for split, lines in files.items():
        text = lines if isinstance(lines, bytes) else "".join(x + "\n" for x in lines)
        (folder / f"{split}.jsonl").write_bytes(
            text if isinstance(text, bytes) else text.encode()
        )
    return folder


def yaml_file(world, name: str, text: str) -> Path:
    file = world["root"] / "yaml" / f"{name}.yaml"
    file.parent.mkdir(exist_ok=True)
    file.write_text(text)
    return file


def metrics_file(world, name: str, lines: list[str]) -> Path:
    folder = world["metrics"] / name
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    return folder


TEXT = [json.dumps({"text": r["text"]}) for r in SST2]


@dataclass
class Case:
    """``argv(world)`` for ``cli``; the exit code and what the line must contain."""

    id: str
    cli: str
    argv: Callable[[dict], list[str]]
    needs: Callable[[dict], str]  # text the error line must contain
    code: int = 1


def train_args(w, *extra, data=None) -> list[str]:
    folder = w["root"] / "out" / "run"
    argv = [*EMBEDDED, "--data", str(data or w["data"]), "--adapter-path", str(folder)]
    return argv + ["--iters", "2", "--max-seq-length", "32", *map(str, extra)]


def on_data(w, *extra) -> list[str]:
    """stories260k on the world's data folder, then ``extra`` (train, no other
    defaults)."""
    return [*EMBEDDED, "--data", str(w["data"]), *map(str, extra)]


def adapter_args(folder, *extra) -> list[str]:
    """``--adapter-path folder``, then ``extra``."""
    return ["--adapter-path", str(folder), *map(str, extra)]


def ppl_args(w, *extra) -> list[str]:
    """The good adapter, perplexity of the world's train.jsonl, then ``extra``."""
    return adapter_args(w["good"], "--ppl", w["data"] / "train.jsonl", *extra)


def drop_config(folder: Path) -> None:
    (folder / CONFIG_NAME).unlink()


def break_config(folder: Path) -> None:
    (folder / CONFIG_NAME).write_text("{not json")


def truncate_weights(folder: Path) -> None:
    (folder / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes()[:300])


def corrupt_resume(folder: Path) -> None:
    (folder / "resume.safetensors").write_bytes(b"garbage")


def yaml_case(id: str, text: str, needs: str) -> Case:
    """A YAML config case: the line names the file, the key and the value.

    The model is stories260k unless the YAML names one (the command line would win).
    """
    model = [] if "model:" in text else EMBEDDED
    return Case(
        id,
        "train",
        lambda w: [
            *model,
            *("--data", str(w["data"]), "--adapter-path", str(w["root"] / "out" / id)),
            *("-c", str(yaml_file(w, id, text))),
        ],
        lambda w: f"{w['root'] / 'yaml' / (id + '.yaml')}: {needs}",
    )


def data_case(id: str, lines, needs: str, **others) -> Case:
    return Case(
        id,
        "train",
        lambda w: train_args(w, data=data_folder(w, id, lines, **others)),
        lambda w: needs.format(dir=w["root"] / "datasets" / id),
    )


CASES = [
    # --- train: data files
    data_case(
        "data-bad-json",
        TEXT[:2] + ['{"text": "x"'] + TEXT[2:],
        "{dir}/train.jsonl line 3: not valid JSON",
    ),
    data_case(
        "data-missing-key",
        TEXT[:4] + ['{"txt": "x"}'],
        "{dir}/train.jsonl line 5: missing key 'text' (found 'txt')",
    ),
    data_case(
        "data-wrong-type",
        ['{"text": 3}'] + TEXT,
        "{dir}/train.jsonl line 1: 'text' must be a string, got int",
    ),
    data_case("data-list-line", ["[1, 2]"] + TEXT, "line 1: expected a JSON object"),
    data_case("data-empty", [], "{dir}/train.jsonl: training set not found or empty"),
    data_case("data-not-utf8", b"\xff\xfe\x00bad\n", "{dir}/train.jsonl: not UTF-8"),
    data_case("data-too-few", TEXT[:3], "has 3 examples, fewer than --batch-size 4"),
    data_case(
        "data-no-format",
        ['{"prompt": "a"}'] * 4,
        "line 1: no mlx-lm data format fits its keys ('prompt')",
    ),
    data_case(
        "data-chat-no-template",
        ['{"messages": [{"role": "user", "content": "hi"}]}'] * 4,
        "{dir}/train.jsonl is a chat dataset",
    ),
    data_case(
        "data-message-not-object",
        ['{"messages": ["hi"]}'] * 4,
        "line 1: every message must be an object with 'role'",
    ),
    data_case(
        "data-bad-valid-line",
        TEXT,
        "{dir}/valid.jsonl line 2: not valid JSON",
        valid=[TEXT[0], "{oops"],
    ),
    Case(
        "data-is-a-file",
        "train",
        lambda w: train_args(w, data=w["data"] / "train.jsonl"),
        lambda w: f"--data {w['data'] / 'train.jsonl'}: not a folder",
    ),
    Case(
        "data-missing-folder",
        "train",
        lambda w: train_args(w, data="./no/such/data"),
        lambda w: "--data ./no/such/data: not a folder",
    ),
    Case(
        "data-test-missing",
        "train",
        lambda w: train_args(w, "--test"),
        lambda w: f"{w['data'] / 'test.jsonl'}: test set not found or empty",
    ),
    Case(
        "data-mask-prompt-on-text",
        "train",
        lambda w: train_args(w, "--mask-prompt", data=data_folder(w, "mask", TEXT)),
        lambda w: "Use a completions or chat dataset",
    ),
    # --- train: YAML
    yaml_case(
        "yaml-invalid", "batch_size: [1,\n", "not valid YAML at line 2, column 1"
    ),
    yaml_case("yaml-list", "- 1\n- 2\n", "expected a mapping of options, got list"),
    yaml_case(
        "yaml-unknown-key", "learning_rte: 1e-3\n", "unknown option(s) learning_rte"
    ),
    yaml_case(
        "yaml-quoted-false-mask",
        'mask_prompt: "false"\n',
        "mask_prompt (--mask-prompt) must be true or false, got 'false' (a string",
    ),
    yaml_case(
        "yaml-quoted-false-gc",
        "grad_checkpoint: 'false'\n",
        "grad_checkpoint (--grad-checkpoint) must be true or false, got 'false'",
    ),
    yaml_case(
        "yaml-quoted-resume",
        "resume: 'no'\n",
        "resume (--resume) must be true or false, got 'no'",
    ),
    yaml_case(
        "yaml-int-bool",
        "trust_remote_code: 1\n",
        "trust_remote_code (--trust-remote-code) must be true or false, got 1",
    ),
    yaml_case(
        "yaml-batch-string",
        "batch_size: four\n",
        "batch_size (--batch-size) must be a positive integer, got 'four'",
    ),
    yaml_case(
        "yaml-lr-string",
        "learning_rate: fast\n",
        "learning_rate (--learning-rate) must be a positive number, got 'fast'",
    ),
    yaml_case(
        "yaml-gate-nan",
        "gate_init: .nan\n",
        "gate_init (--gate-init) must be a finite number, got nan",
    ),
    yaml_case(
        "yaml-rank-zero",
        "rank: 0\n",
        "rank (--rank) must be a positive integer, got 0",
    ),
    yaml_case(
        "yaml-model-int", "model: 123\n", "model (--model) must be a non-empty string"
    ),
    yaml_case(
        "yaml-seed-negative",
        "seed: -1\n",
        "seed (--seed) must be a non-negative integer, got -1",
    ),
    yaml_case("yaml-iters-and-epochs", "iters: 3\nepochs: 1\n", "give iters or epochs"),
    yaml_case(
        "yaml-optimizer",
        "optimizer: adamx\n",
        "optimizer (--optimizer) must be one of adam, adamw, muon, sgd, adafactor",
    ),
    yaml_case(
        "yaml-optimizer-setting",
        "optimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: '0.01'\n",
        "optimizer_config.adamw.weight_decay must be a number",
    ),
    yaml_case(
        "yaml-optimizer-config-list",
        "optimizer_config: [adam]\n",
        "optimizer_config (--optimizer-config) must be a mapping",
    ),
    yaml_case(
        "yaml-schedule-name",
        "lr_schedule: {name: cosine_decy, arguments: [1e-3, 10]}\n",
        "lr_schedule.name must name an mlx.optimizers schedule",
    ),
    yaml_case(
        "yaml-schedule-arguments",
        "lr_schedule: {name: cosine_decay, arguments: ['1e-3', 10]}\n",
        "lr_schedule.arguments must be a list of numbers, got ['1e-3', 10]",
    ),
    yaml_case(
        "yaml-schedule-warmup",
        "lr_schedule: {name: cosine_decay, arguments: [1e-3, 10], warmup: ten}\n",
        "lr_schedule.warmup must be an integer >= 0, got 'ten'",
    ),
    yaml_case(
        "yaml-max-seq",
        "max_seq_length: 1\n",
        "max_seq_length (--max-seq-length) must be an integer >= 2, got 1",
    ),
    yaml_case(
        "yaml-cache-threshold",
        "clear_cache_threshold: lots\n",
        "clear_cache_threshold (--clear-cache-threshold) must be a size in bytes",
    ),
    Case(
        "yaml-missing-file",
        "train",
        lambda w: train_args(w, "-c", w["root"] / "nope.yaml"),
        lambda w: f"{w['root'] / 'nope.yaml'}: cannot read config",
    ),
    # --- train: flags
    Case(
        "flag-batch-zero",
        "train",
        lambda w: train_args(w, "--batch-size", "0"),
        lambda w: "batch_size (--batch-size) must be a positive integer, got 0",
    ),
    Case(
        "flag-gate-nan",
        "train",
        lambda w: train_args(w, "--gate-init", "nan"),
        lambda w: "gate_init (--gate-init) must be a finite number, got nan",
    ),
    Case(
        "flag-rank-too-big",
        "train",
        lambda w: train_args(w, "--rank", "65"),
        lambda w: "rank must be at most the model width d=64",
    ),
    Case(
        "flag-num-layers",
        "train",
        lambda w: train_args(w, "--num-layers", "9"),
        lambda w: "num_layers must be -1 (all) or in 1..5 for this model, got 9",
    ),
    Case(
        "flag-lr-zero",
        "train",
        lambda w: train_args(w, "--learning-rate", "0"),
        lambda w: "learning_rate (--learning-rate) must be a positive number, got 0.0",
    ),
    Case(
        "flag-epochs-zero",
        "train",
        lambda w: on_data(w, "--epochs", "0"),
        lambda w: "epochs (--epochs) must be a positive integer, got 0",
    ),
    Case(
        "flag-iters-and-epochs",
        "train",
        lambda w: train_args(w, "--epochs", "1"),
        lambda w: "Give iters or epochs, not both (on the command line)",
    ),
    Case(
        "flag-optimizer",
        "train",
        lambda w: train_args(w, "--optimizer", "adamx"),
        lambda w: "argument --optimizer: invalid choice: 'adamx'",
        code=2,
    ),
    Case(
        "flag-batch-not-int",
        "train",
        lambda w: train_args(w, "--batch-size", "four"),
        lambda w: "argument --batch-size: invalid int value: 'four'",
        code=2,
    ),
    Case(
        "flag-resume-both",
        "train",
        lambda w: train_args(w, "--resume", "--resume-adapter-file", "x"),
        lambda w: "Give --resume (exact, from --adapter-path) or --resume-adapter-file",
    ),
    Case(
        "flag-resume-adapter-missing",
        "train",
        lambda w: train_args(w, "--resume-adapter-file", w["root"] / "none.st"),
        lambda w: f"--resume-adapter-file {w['root'] / 'none.st'}: not found",
    ),
    Case(
        "flag-model-missing-folder",
        "train",
        lambda w: train_args(w, "--model", "./nowhere"),
        lambda w: "--model ./nowhere: no such folder",
    ),
    Case(
        "flag-model-offline-hub",
        "train",
        lambda w: train_args(w, "--model", OFFLINE_ID),
        lambda w: f"cannot load model {OFFLINE_ID}",
    ),
    Case(
        "flag-attributes-missing",
        "train",
        lambda w: train_args(w, "--attributes", w["root"] / "attrs.yaml"),
        lambda w: "--attributes",
    ),
    Case(
        "flag-steer-only-without-attributes",
        "train",
        lambda w: train_args(w, "--steer-only"),
        lambda w: "--steer-only: it trains attributes; give --attributes too",
    ),
    # --- train: adapter folders and resume
    Case(
        "adapter-path-is-file",
        "train",
        lambda w: on_data(w, "--adapter-path", w["file"]),
        lambda w: f"{w['file']}: is a file, not a folder",
    ),
    Case(
        "adapter-path-under-file",
        "train",
        lambda w: on_data(w, "--adapter-path", w["file"] / "a"),
        lambda w: f"{w['file'] / 'a'}: cannot write there (Not a directory)",
    ),
    Case(
        "adapter-foreign-lora",
        "train",
        lambda w: on_data(
            w,
            "--adapter-path",
            variant(
                w, "lora", edit_config(fine_tune_type="lora", braces_parameters=None)
            ),
        ),
        lambda w: (
            "the folder holds a lora adapter, not braces; training would "
            "replace it: pass --overwrite"
        ),
    ),
    Case(
        "adapter-weights-without-config",
        "train",
        lambda w: on_data(w, "--adapter-path", variant(w, "noconfig", drop_config)),
        lambda w: f"adapters.safetensors: an adapter without {CONFIG_NAME}",
    ),
    Case(
        "resume-nothing",
        "train",
        lambda w: on_data(w, "--resume", "--adapter-path", w["folder"]),
        lambda w: f"{w['folder'] / 'resume.safetensors'}: not found, nothing to resume",
    ),
    Case(
        "resume-other-rank",
        "train",
        lambda w: on_data(
            w,
            *("--adapter-path", variant(w, "resume-rank", lambda f: None)),
            *("--rank", "8", "--resume", "--iters", "4"),
        ),
        lambda w: "use the same --rank and model as the run that wrote it",
    ),
    Case(
        "resume-corrupt",
        "train",
        lambda w: on_data(
            w,
            *("--resume", "--iters", "4", "--rank", "4"),
            *("--adapter-path", variant(w, "resume-corrupt", corrupt_resume)),
        ),
        lambda w: "resume.safetensors: not a resume checkpoint",
    ),
    Case(
        "test-only-lora-folder",
        "train",
        lambda w: [
            *EMBEDDED,
            *("--data", str(data_folder(w, "with-test", TEXT, test=TEXT)), "--test"),
            *adapter_args(variant(w, "lora", edit_config(fine_tune_type="lora"))),
        ],
        lambda w: "fine_tune_type is 'lora', not 'braces'",
    ),
    # --- generate
    Case(
        "generate-adapter-is-file",
        "generate",
        lambda w: ["--adapter-path", str(w["file"]), "--max-tokens", "2"],
        lambda w: f"{w['file']}: is a file, not an adapter folder",
    ),
    Case(
        "generate-adapter-no-config",
        "generate",
        lambda w: ["--adapter-path", str(w["empty"]), "--max-tokens", "2"],
        lambda w: f"{w['empty'] / CONFIG_NAME}: not found",
    ),
    Case(
        "generate-config-not-json",
        "generate",
        lambda w: adapter_args(variant(w, "badjson", break_config)),
        lambda w: f"{CONFIG_NAME}: not valid JSON",
    ),
    Case(
        "generate-offline-model",
        "generate",
        lambda w: ["--model", OFFLINE_ID, "--max-tokens", "2"],
        lambda w: f"cannot load model {OFFLINE_ID}: no such folder, and ",
    ),
    Case(
        "generate-relative-missing-model",
        "generate",
        lambda w: ["--model", "./M", "--max-tokens", "2"],
        lambda w: "cannot load model ./M: no such folder",
    ),
    Case(
        "generate-newer-format",
        "generate",
        lambda w: adapter_args(
            variant(w, "newer", edit_config(format_version=99)), "--max-tokens", "2"
        ),
        lambda w: "format_version 99 is newer than this mlx_braces",
    ),
    Case(
        "generate-truncated-weights",
        "generate",
        lambda w: adapter_args(
            variant(w, "truncated", truncate_weights), "--max-tokens", "2"
        ),
        lambda w: f"{WEIGHTS_NAME}: cannot read",
    ),
    Case(
        "generate-unknown-attribute",
        "generate",
        lambda w: ["--adapter-path", str(w["good"]), "--attribute", "positive"],
        lambda w: "this adapter was trained without attributes",
    ),
    Case(
        "generate-strength-pairs",
        "generate",
        lambda w: ["--adapter-path", str(w["good"]), "--strength", "1"],
        lambda w: "--attribute and --strength come in pairs",
        code=2,
    ),
    Case(
        "generate-no-model-recorded",
        "generate",
        lambda w: adapter_args(variant(w, "nomodel", edit_config(model=None))),
        lambda w: "records no base model (field 'model'); pass --model",
    ),
    # --- evaluate
    Case(
        "evaluate-output-is-folder",
        "evaluate",
        lambda w: ppl_args(w, "--output", w["folder"]),
        lambda w: f"--output {w['folder']}: is a folder; give a file name",
    ),
    Case(
        "evaluate-output-under-file",
        "evaluate",
        lambda w: ppl_args(w, "--output", w["file"] / "r.json"),
        lambda w: f"{w['file']} is a file, not a folder",
    ),
    Case(
        "evaluate-ppl-missing",
        "evaluate",
        lambda w: adapter_args(w["good"], "--ppl", w["root"] / "x.jsonl"),
        lambda w: f"{w['root'] / 'x.jsonl'}: file not found",
    ),
    Case(
        "evaluate-ppl-bad-line",
        "evaluate",
        lambda w: adapter_args(
            w["good"],
            "--ppl",
            data_folder(w, "ppl-bad", [TEXT[0], "{no"]) / "train.jsonl",
        ),
        lambda w: "train.jsonl line 2: not valid JSON",
    ),
    Case(
        "evaluate-task-file-missing",
        "evaluate",
        lambda w: adapter_args(w["good"], "--data", w["root"] / "t.json"),
        lambda w: f"{w['root'] / 't.json'}: file not found",
    ),
    Case(
        "evaluate-offline-model",
        "evaluate",
        lambda w: ["--model", OFFLINE_ID, "--ppl", str(w["data"] / "train.jsonl")],
        lambda w: f"cannot load model {OFFLINE_ID}",
    ),
    Case(
        "evaluate-batch-zero",
        "evaluate",
        lambda w: ppl_args(w, "--batch-size", "0"),
        lambda w: "--batch-size must be at least 1, got 0",
        code=2,
    ),
    Case(
        "evaluate-nothing-to-do",
        "evaluate",
        lambda w: ["--adapter-path", str(w["good"])],
        lambda w: "nothing to do",
        code=2,
    ),
    # --- inspect
    Case(
        "inspect-adapter-is-file",
        "inspect",
        lambda w: ["--adapter-path", str(w["file"]), "--prompt", "hi"],
        lambda w: f"{w['file']}: is a file, not an adapter folder",
    ),
    Case(
        "inspect-offline-model",
        "inspect",
        lambda w: adapter_args(w["good"], "--model", OFFLINE_ID, "--prompt", "x"),
        lambda w: f"cannot load model {OFFLINE_ID}",
    ),
    Case(
        "inspect-top-vectors-zero",
        "inspect",
        lambda w: adapter_args(w["good"], "--prompt", "hi", "--top-vectors", "0"),
        lambda w: "top_vectors and top_tokens must be at least 1",
    ),
    Case(
        "inspect-strength-pairs",
        "inspect",
        lambda w: adapter_args(w["good"], "--prompt", "hi", "--strength", "1"),
        lambda w: "--attribute and --strength pair up in order",
    ),
    # --- plot
    Case(
        "plot-no-metrics",
        "plot",
        lambda w: [str(w["folder"])],
        lambda w: f"{w['folder'] / 'metrics.jsonl'}: not found",
    ),
    Case(
        "plot-bad-line",
        "plot",
        lambda w: [str(metrics_file(w, "bad", ['{"type": "train"', "{}"]))],
        lambda w: "metrics.jsonl line 1: not valid JSON",
    ),
    Case(
        "plot-no-type",
        "plot",
        lambda w: [str(metrics_file(w, "notype", ['{"iteration": 1}']))],
        lambda w: "metrics.jsonl line 1: expected a string 'type'",
    ),
    Case(
        "plot-nan-loss",
        "plot",
        lambda w: [
            str(
                metrics_file(
                    w,
                    "nan",
                    [
                        '{"type": "train", "iteration": 1, "train_loss": NaN, '
                        '"tokens_per_second": 1, "peak_memory": 1}'
                    ],
                )
            )
        ],
        lambda w: "train report needs a finite number under 'train_loss', got nan",
    ),
    Case(
        "plot-output-is-folder",
        "plot",
        lambda w: [str(w["good"]), "-o", str(w["folder"])],
        lambda w: f"{w['folder']}: is a folder; give a file name",
    ),
    # --- server (startup)
    Case(
        "server-adapter-is-file",
        "server",
        lambda w: ["--adapter-path", str(w["file"])],
        lambda w: f"{w['file']}: is a file, not an adapter folder",
    ),
    Case(
        "server-offline-model",
        "server",
        lambda w: ["--model", OFFLINE_ID],
        lambda w: f"cannot load model {OFFLINE_ID}",
    ),
    Case(
        "server-config-not-json",
        "server",
        lambda w: adapter_args(variant(w, "badjson", break_config)),
        lambda w: f"{CONFIG_NAME}: not valid JSON",
    ),
]

MAINS = {
    "train": train_cli.main,
    "generate": generate_cli.main,
    "evaluate": evaluate_cli.main,
    "inspect": inspect_cli.main,
    "plot": plot_cli.main,
}


def run_cli(cli: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Exit status and stderr of ``python -m mlx_braces.CLI argv``, in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        if cli == "server":  # mlx-lm's server parses sys.argv itself
            monkeypatch.setattr(sys, "argv", ["mlx_braces.server", *argv])

            def serve(*args, **kwargs):  # reached only if startup let it through
                raise AssertionError("the server started despite the bad input")

            monkeypatch.setattr(server_cli._mlx, "_run_http_server", serve)
            server_cli.main()
        else:
            MAINS[cli](argv)
    err = capsys.readouterr().err
    code = e.value.code
    if isinstance(code, str):  # sys.exit("Error: ..."): Python prints it, status 1
        err, code = err + code + "\n", 1
    return code, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_cli_input_is_one_clear_line(world, case, capsys, monkeypatch):
    code, err = run_cli(case.cli, case.argv(world), capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert "Traceback" not in err, err
    needs = case.needs(world)
    if case.code == 2:  # argparse: usage, then "prog: error: ..."
        assert "error: " in lines[-1] and needs in lines[-1], err
        return
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and needs in lines[0], err


def test_read_only_adapter_folder(world, tmp_path, capsys, monkeypatch):
    """A good adapter on a read-only disk: train says so before loading the model."""
    folder = tmp_path / "ro"
    shutil.copytree(world["good"], folder)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    else:  # root writes anywhere: a read-only bind mount of the folder
        if subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        undo = lambda: subprocess.run(["umount", str(folder)], check=True)  # noqa: E731
    try:
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        code, err = run_cli(
            "train", on_data(world, "--adapter-path", folder),
            capsys, monkeypatch,
        )  # fmt: skip
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert f"Error: {folder}: cannot write there (" in err
        assert "Loading pretrained model" not in capsys.readouterr().out
        # --test alone only reads it: the result is printed, a warning says why
        # it is not logged.
        data = data_folder(world, "ro-test", TEXT, test=TEXT)
        train_cli.main([*EMBEDDED, "--data", str(data), "--test"]
                       + ["--adapter-path", str(folder)])  # fmt: skip
        out = capsys.readouterr().out
        assert "Test loss " in out and "Warning: cannot add the test result" in out
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    finally:
        undo()


def test_locked_adapter_folder(world, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "busy"
    shutil.copytree(world["good"], folder)
    with locked(folder):
        code, err = run_cli(
            "train", on_data(world, "--adapter-path", folder),
            capsys, monkeypatch,
        )  # fmt: skip
    assert code == 1 and err.count("\n") == 1
    assert f"{folder}: another process is writing to this adapter folder" in err


# ---------------------------------------------------------------------------
# The Python API


@pytest.fixture(scope="module")
def braced():
    model, tokenizer = mlx_load(str(EMBEDDED_MODEL))
    apply_braces(model, rank=4, seed=0)
    return model


def fresh():
    return mlx_load(str(EMBEDDED_MODEL))[0]


API = [
    ("gate-nan", lambda w, b: apply_braces(fresh(), gate_init=float("nan")),
     ValueError, "gate_init must be a finite number or -inf (a closed gate, g = 0), got nan"),
    ("gate-inf", lambda w, b: apply_braces(fresh(), gate_init=math.inf),
     ValueError, "gate_init must be a finite number or -inf (a closed gate, g = 0), got inf"),
    ("gate-string", lambda w, b: apply_braces(fresh(), gate_init="-5"),
     ValueError, "gate_init must be a finite number or -inf (a closed gate, g = 0), got '-5'"),
    ("seed-negative", lambda w, b: apply_braces(fresh(), seed=-1),
     ValueError, "seed must be None or an integer in 0..2**64-1, got -1"),
    ("seed-string", lambda w, b: apply_braces(fresh(), seed="0"),
     ValueError, "seed must be None or an integer in 0..2**64-1, got '0'"),
    ("rank-zero", lambda w, b: apply_braces(fresh(), rank=0),
     ValueError, "rank must be a positive integer, got 0"),
    ("num-layers-bool", lambda w, b: apply_braces(fresh(), num_layers=True),
     ValueError, "num_layers must be -1 (all) or in 1..5 for this model, got True"),
    ("not-a-model", lambda w, b: apply_braces({"layers": []}),
     ValueError, "model must be an mlx.nn.Module (an mlx-lm model), got dict"),
    ("braced-twice", lambda w, b: apply_braces(b),
     ValueError, "Model is already braced"),
    ("load-adapter-none", lambda w, b: load_adapter(fresh(), None),
     AdapterError, "adapter_path must be a folder path (str or os.PathLike), got None"),
    ("load-adapter-file", lambda w, b: load_adapter(fresh(), w["file"]),
     AdapterError, "a_file.txt: is a file, not an adapter folder"),
    ("load-adapter-not-model", lambda w, b: load_adapter("model", w["good"]),
     AdapterError, "model must be an mlx.nn.Module (an mlx-lm model), got str"),
    ("load-adapter-weights-int", lambda w, b: load_adapter(fresh(), w["good"], 3),
     AdapterError, "weights must be a file name in"),
    ("load-adapter-weights-missing",
     lambda w, b: load_adapter(fresh(), w["good"], "0000099_adapters.safetensors"),
     AdapterError, "0000099_adapters.safetensors: not found"),
    ("steer-string", lambda w, b: steer(b, "positive"),
     SteeringError, "got 'positive'"),
    ("steer-not-model", lambda w, b: steer(None, {"positive": 1.0}),
     SteeringError, "model must be an mlx.nn.Module (a braced model), got NoneType"),
    ("steer-no-attributes", lambda w, b: steer(b, {"positive": 1.0}),
     SteeringError, "this adapter was trained without attributes"),
    ("load-no-model", lambda w, b: load(),
     AdapterError, "No model given and no adapter."),
    ("load-offline", lambda w, b: load(OFFLINE_ID),
     ModelLoadError, f"cannot load model {OFFLINE_ID}: no such folder"),
    ("load-model-not-str", lambda w, b: load(3),
     ModelLoadError, "path_or_hf_repo must be a model folder, Hub id or name, got 3"),
    ("save-adapter-unbraced", lambda w, b: save_adapter(fresh(), w["root"] / "sv"),
     AdapterError, "Model has no braced layers"),
    ("save-adapter-onto-file", lambda w, b: save_adapter(b, w["file"]),
     AdapterError, "a_file.txt: is a file, not an adapter folder"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, error, needs", [a[1:] for a in API], ids=[a[0] for a in API]
)
def test_bad_api_input_is_one_clear_exception(world, braced, call, error, needs):
    with pytest.raises(error) as e:
        call(world, braced)
    message = str(e.value)
    assert needs in message and "\n" not in message


def test_load_offline_error_is_also_an_oserror():
    """API users who catch mlx-lm's OSError for a missing model still do."""
    with pytest.raises(OSError):
        load(OFFLINE_ID)


def test_nan_gate_never_reaches_the_model(world):
    model = fresh()
    with pytest.raises(ValueError):
        apply_braces(model, gate_init=float("nan"))
    assert not braced_layers(model)  # refused before any layer was braced
    out = model(mx.array([[1, 2, 3]]))
    assert mx.all(mx.isfinite(out)).item()


def test_relative_base_model_stays_usable(world, tmp_path, monkeypatch, capsys):
    """``--model M`` (a folder here) is recorded absolute; an old relative entry is
    found again beside the adapter, from any working directory."""
    shutil.copytree(EMBEDDED_MODEL, tmp_path / "M")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "M", "--data", str(world["data"]), "--adapter-path", "ad"]
    train_cli.main(argv + ["--rank", "4", "--iters", "1", "--max-seq-length", "32"])
    config = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert config["model"] == str(tmp_path / "M")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    load(adapter_path=str(tmp_path / "ad"))  # the recorded absolute path
    config["model"] = "M"  # as adapters written before this fix recorded it
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(config))
    model, _ = load(adapter_path=str(tmp_path / "ad"))  # found beside the adapter
    assert braced_layers(model)
    config["model"] = "./gone"
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as e:
        load(adapter_path=str(tmp_path / "ad"))
    recorded = f"(recorded in {tmp_path / 'ad' / CONFIG_NAME})"
    assert str(e.value) == f"cannot load model ./gone {recorded}: no such folder"
    code, err = run_cli(
        "generate", ["--adapter-path", str(tmp_path / "ad")], capsys, monkeypatch
    )
    assert code == 1 and err == "Error: cannot load model ./gone: no such folder\n"
