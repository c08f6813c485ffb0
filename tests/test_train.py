"""``python -m mlx_braces.train``: training, exact resume, safe saves and bad input.

Runs the real CLI on the embedded stories260K model (``--model stories260k``: 4-bit,
no download) and small slices of the embedded SST-2 data; losses are compared across
runs exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load

from mlx_braces import apply_braces, load, load_adapter
from mlx_braces.adapters import RESUME_NAME
from mlx_braces.braces import orthonormality_error
from mlx_braces.train import (
    EMBEDDED_DATA,
    EMBEDDED_MODEL,
    TrainingArgs,
    build_optimizer,
    default_loss,
    load_datasets,
    load_model,
    main,
    resolve_args,
    run,
)
from mlx_braces.trainer import (
    TrainingError,
    TrainingInterrupted,
    check_batch_size,
    iterate_batches,
    train,
)

os.environ["HF_HUB_OFFLINE"] = "1"
# The embedded toy model; with no --model the CLI would train SmolLM2 (quickstart).
EMBEDDED = ["--model", "stories260k"]
SST2 = [json.loads(line) for line in open(EMBEDDED_DATA / "train.jsonl")]


def write_data(folder: Path, train=8, valid=4, test=4, records=None) -> Path:
    """A data folder with the first SST-2 sentences (or ``records``) as text data."""
    folder.mkdir(parents=True, exist_ok=True)
    records = records or [{"text": r["text"]} for r in SST2]
    start = 0
    for name, n in (("train", train), ("valid", valid), ("test", test)):
        rows = records[start : start + n]
        start += n
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    return folder


def metrics(adapter: Path, kind: str, key: str) -> list:
    rows = [json.loads(line) for line in open(adapter / "metrics.jsonl")]
    return [r[key] for r in rows if r["type"] == kind]


def weights(file: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(file)).items()}


def error_of(capsys, argv: list[str]) -> str:
    """Run the CLI (on stories260k unless argv gives --model) expecting a user error;
    returns its one-line message."""
    with pytest.raises(SystemExit) as e:
        main([*EMBEDDED, *argv])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err
    return err


# Settings shared by the runs compared for exact resume: two batches an epoch, so
# six iterations span three shuffled epochs; gradient accumulation and a warmup +
# cosine schedule make the optimizer state and schedule position matter.
RESUME_YAML = {
    "batch_size": 2,
    "iters": 6,
    "steps_per_report": 1,
    "steps_per_eval": 2,
    "val_batches": 1,
    "save_every": 2,
    "grad_accumulation_steps": 2,
    "max_seq_length": 40,
    "lr_schedule": {"name": "cosine_decay", "arguments": [1e-2, 6], "warmup": 2},
}


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """Data, config and an uninterrupted reference run for the resume tests."""
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "data", train=5, valid=2, test=0)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(RESUME_YAML))
    reference = root / "reference"
    argv = ["-c", str(config), "--data", str(data), "--adapter-path", str(reference)]
    main([*EMBEDDED, *argv])
    return config, data, reference


def same_run(a: Path, b: Path) -> None:
    for kind, key in [
        ("train", "train_loss"),
        ("train", "learning_rate"),
        ("train", "trained_tokens"),
        ("train", "iteration"),
        ("val", "val_loss"),
    ]:
        assert metrics(a, kind, key) == metrics(b, kind, key), key
    wa, wb = weights(a / "adapters.safetensors"), weights(b / "adapters.safetensors")
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_loss_decreases_adapter_loads_and_test_set(tmp_path, capsys):
    data = write_data(tmp_path / "data", train=8, valid=8, test=8)
    adapter = tmp_path / "adapter"
    argv = [*EMBEDDED, "--data", str(data), "--adapter-path", str(adapter)]
    argv += ["--batch-size", "4", "--max-seq-length", "40", "--iters", "30"]
    argv += ["--steps-per-eval", "30"]
    argv += ["--learning-rate", "2e-2", "--val-batches", "-1", "--train", "--test"]
    main(argv)
    out = capsys.readouterr().out
    assert "Trainable parameters: " in out
    assert "Quantized the embedded model to 4 bits" in out
    assert "mlp.down_proj (input dims 172 not a multiple of 64)" in out
    assert "Iter 10: Train loss " in out and ", Peak mem " in out
    assert f"Saved final weights to {adapter / 'adapters.safetensors'}." in out

    train_loss = metrics(adapter, "train", "train_loss")
    val_loss = metrics(adapter, "val", "val_loss")
    assert metrics(adapter, "val", "iteration") == [0, 30]
    assert train_loss[-1] < train_loss[0] - 0.3
    assert val_loss[-1] < val_loss[0]
    rows = [json.loads(line) for line in open(adapter / "metrics.jsonl")]
    (test,) = [r for r in rows if r["type"] == "test"]
    assert test["iteration"] == 30
    assert math.isclose(test["test_ppl"], math.exp(test["test_loss"]))
    assert f"Test loss {test['test_loss']:.3f}, Test ppl {test['test_ppl']:.3f}." in out

    # The adapter loads (onto the recorded base model) with the trained weights,
    # and every R kept orthonormal rows through training.
    model, _ = load(adapter_path=str(adapter))
    trained = weights(adapter / "adapters.safetensors")
    assert len(trained) == 10  # R and gate of 5 layers
    loaded = dict(tree_flatten(model.parameters()))
    for k, v in trained.items():
        np.testing.assert_array_equal(np.array(loaded[k]), v)
    assert orthonormality_error(model) < 1e-4
    umask = os.umask(0)
    os.umask(umask)
    for file in adapter.iterdir():  # atomic writes keep the usual file mode
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "braces" and "lora_parameters" not in config
    assert config["base_quantization"] == {"bits": 4, "group_size": 64}
    assert config["learning_rate"] == 2e-2 and config["iters"] == 30

    # --test alone evaluates the adapter in --adapter-path: the same test loss.
    argv = [*EMBEDDED, "--data", str(data), "--adapter-path", str(adapter), "--test"]
    main(argv + ["--batch-size", "4", "--max-seq-length", "40"])
    assert f"Test loss {test['test_loss']:.3f}," in capsys.readouterr().out
    assert metrics(adapter, "test", "test_loss") == [test["test_loss"]] * 2

    # --resume-adapter-file starts from those weights: the first validation of the
    # new run is the last one of the old.
    again = tmp_path / "again"
    argv = [*EMBEDDED, "--data", str(data), "--adapter-path", str(again)]
    argv += ["--batch-size", "4", "--max-seq-length", "40", "--iters", "1"]
    argv += ["--val-batches", "-1"]
    main(argv + ["--resume-adapter-file", str(adapter / "adapters.safetensors")])
    assert metrics(again, "val", "val_loss")[0] == val_loss[-1]


def test_resume_after_ctrl_c_is_exact(resume_setup, tmp_path):
    config, data, reference = resume_setup
    adapter = tmp_path / "adapter"

    class CtrlC:  # a real SIGINT, sent after iteration 3's report
        def on_train_loss_report(self, info):
            if info["iteration"] == 3:
                os.kill(os.getpid(), signal.SIGINT)

        def on_val_loss_report(self, info):
            pass

    cli = {"config": str(config), "data": str(data), "adapter_path": str(adapter)}
    cli["model"] = "stories260k"
    with pytest.raises(TrainingInterrupted) as e:
        run(resolve_args(dict(cli)), training_callback=CtrlC())
    assert e.value.iteration == 3  # mid-accumulation: a pending gradient is saved
    meta = mx.load(str(adapter / RESUME_NAME), return_metadata=True)[1]
    assert json.loads(meta["mlx_braces_resume"])["iteration"] == 3
    assert metrics(adapter, "train", "iteration") == [1, 2, 3]

    run(resolve_args(dict(cli, resume=True)))
    same_run(reference, adapter)


def test_ctrl_c_in_a_subprocess_saves_and_exits_130(tmp_path):
    data = write_data(tmp_path / "data", train=8, valid=4, test=0)
    adapter = tmp_path / "adapter"
    cmd = [sys.executable, "-u", "-m", "mlx_braces.train", *EMBEDDED]
    cmd += ["--data", str(data)]
    cmd += ["--adapter-path", str(adapter), "--iters", "100000", "--max-seq-length"]
    cmd += ["32", "--steps-per-report", "1", "--val-batches", "1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Iter 2: Train loss"):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    it = int(out.split("Interrupted after iteration ")[1].split(":")[0])
    assert it >= 2
    assert f"checkpoint saved in {adapter}; run the same command with --resume" in out
    meta = mx.load(str(adapter / RESUME_NAME), return_metadata=True)[1]
    assert json.loads(meta["mlx_braces_resume"])["iteration"] == it
    assert (adapter / f"{it:07d}_adapters.safetensors").is_file()


KILL_DURING_SAVE = """
import os, signal, sys
import mlx_braces  # first: the BLAS MLX binds to, as in the test process (conftest)
import mlx.core as mx
from mlx_braces.train import main

real, calls = mx.save_safetensors, []

def save(file, arrays, metadata=None):
    real(file, arrays, metadata=metadata)
    if os.path.basename(file).startswith(".adapters."):
        calls.append(file)
        if len(calls) == 2:  # writing adapters.safetensors of iteration 4
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

mx.save_safetensors = save
main(sys.argv[1:])
"""


def test_kill_during_save_keeps_previous_checkpoint(resume_setup, tmp_path):
    config, data, reference = resume_setup
    adapter = tmp_path / "adapter"
    argv = [*EMBEDDED, "-c", str(config), "--data", str(data)]
    argv += ["--adapter-path", str(adapter)]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *argv], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "Iter 4: Train loss" in proc.stdout
    # The half-written temporary file is all that the kill left behind; the
    # checkpoint of iteration 2 is intact and loads.
    (partial,) = adapter.glob(".adapters.*.safetensors")
    with pytest.raises((RuntimeError, ValueError)):
        mx.load(str(partial))
    assert weights(adapter / "adapters.safetensors").keys()
    np.testing.assert_equal(
        weights(adapter / "adapters.safetensors"),
        weights(adapter / "0000002_adapters.safetensors"),
    )
    model, _ = mlx_load(str(EMBEDDED_MODEL))
    load_adapter(model, adapter)
    meta = mx.load(str(adapter / RESUME_NAME), return_metadata=True)[1]
    assert json.loads(meta["mlx_braces_resume"])["iteration"] == 2

    main(argv + ["--resume"])  # iterations 3.. again, as if never interrupted
    same_run(reference, adapter)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    args = resolve_args(
        {
            "model": "stories260k",
            "data": str(write_data(tmp_path / "data", train=8, valid=0, test=0)),
        }
    )
    model, tokenizer = load_model(args)
    train_set, _, _ = load_datasets(args, tokenizer)
    apply_braces(model, rank=4, seed=0)

    # The hooks steering uses: batches with an extra per-batch input for the loss.
    def batches(dataset, batch_size, max_seq_length, loop=False, seed=None,
                comm_group=None, start=0):  # fmt: skip
        stream = iterate_batches(
            dataset, batch_size, max_seq_length, loop, seed, comm_group, start
        )
        for it, (batch, lengths) in enumerate(stream, start + 1):
            yield batch, lengths, mx.array(mx.nan if it == 4 else 1.0)

    def loss(model, batch, lengths, scale):
        value, ntoks = default_loss(model, batch, lengths)
        return value * scale, ntoks

    adapter = tmp_path / "adapter"
    targs = TrainingArgs(
        batch_size=4,
        iters=10,
        steps_per_save=2,
        adapter_file=str(adapter / "adapters.safetensors"),
        max_seq_length=32,
    )
    optimizer = build_optimizer(args)
    with pytest.raises(TrainingError) as e:
        train(model, optimizer, train_set, None, targs, loss, batches)
    message = str(e.value)
    assert message.startswith("loss is nan at iteration 4; last good checkpoint ")
    assert "0000002_adapters.safetensors (iteration 2) kept" in message
    np.testing.assert_equal(
        weights(adapter / "adapters.safetensors"),
        weights(adapter / "0000002_adapters.safetensors"),
    )
    assert not (adapter / "0000004_adapters.safetensors").exists()


def test_cli_reports_non_finite_training(tmp_path, capsys):
    data = write_data(tmp_path / "data", train=8, valid=0, test=0)
    argv = ["--data", str(data), "--adapter-path", str(tmp_path / "a")]
    argv += ["--iters", "5", "--learning-rate", "1e38", "--max-seq-length", "32"]
    err = error_of(capsys, argv)
    assert "at iteration 1; no checkpoint had been saved yet" in err


# ---------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"text": "a b"}', '{"text": "c d"', '{"text": "e"}'],
            "line 2: not valid JSON",
        ),
        (['{"text": "a"}', '{"txt": "b"}'], "line 2: missing key 'text' (found 'txt')"),
        (['{"text": "a"}', '["a list"]'], "line 2: expected a JSON object, got list"),
        (['{"prompt": "a"}'], "line 1: no mlx-lm data format fits its keys ('prompt')"),
        (['{"text": 3}'], "line 1: 'text' must be a string, got int"),
        ([], "train.jsonl: training set not found or empty"),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}'] * 4,
            "train.jsonl is a chat dataset, which mlx-lm formats with the tokenizer's "
            "chat template, but the tokenizer of stories260k has none",
        ),
        (
            ['{"prompt": "a", "completion": "b"}'] * 4,
            "is a completions dataset, which mlx-lm formats",
        ),
        (
            ['{"text": "a"}'] * 3,
            "train.jsonl has 3 examples, fewer than --batch-size 4",
        ),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, capsys, lines, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    err = error_of(capsys, ["--data", str(data), "--adapter-path", str(tmp_path)])
    assert f"{data / 'train.jsonl'}" in err
    assert message in err


def test_bad_options_are_one_clear_error(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    base = ["--data", str(data)]
    assert "Give iters or epochs, not both (on the command line)" in error_of(
        capsys, base + ["--iters", "3", "--epochs", "1"]
    )
    config = tmp_path / "c.yaml"
    config.write_text("learning_rte: 1e-3\n")
    assert f"{config}: unknown option(s) learning_rte" in error_of(
        capsys, base + ["-c", str(config)]
    )
    config.write_text("batch_size: four\n")
    assert (
        "batch_size (--batch-size) must be a positive integer, got 'four'"
        in error_of(capsys, base + ["-c", str(config)])
    )
    assert "--model ./nowhere: no such folder" in error_of(
        capsys, base + ["--model", "./nowhere"]
    )
    assert "rank must be at most the model width d=64" in error_of(
        capsys, base + ["--rank", "65", "--adapter-path", str(tmp_path / "a")]
    )
    assert (
        f"{tmp_path / 'none' / RESUME_NAME}: not found, nothing to resume"
        in error_of(
            capsys, base + ["--resume", "--adapter-path", str(tmp_path / "none")]
        )
    )


def test_long_sequences_warn_once_with_counts(tmp_path, capsys):
    data = write_data(tmp_path / "data", train=8, valid=0, test=0)
    _, tokenizer = load_model(resolve_args({"model": "stories260k"}))
    # Token counts as mlx-lm's text format makes them (BOS ... EOS).
    lengths = [len(tokenizer.encode(r["text"])) + 1 for r in SST2[:8]]
    limit = sorted(lengths)[4]
    n_long = sum(n > limit for n in lengths)
    assert 0 < n_long < 8
    args = resolve_args(
        {"model": "stories260k", "data": str(data), "max_seq_length": limit}
    )
    capsys.readouterr()
    (train_set, _, _) = load_datasets(args, tokenizer)
    out = capsys.readouterr().out
    assert out.count("are longer than") == 1
    assert (
        f"Warning: {n_long} of 8 examples in {data / 'train.jsonl'} are longer than "
        f"--max-seq-length {limit} tokens (longest {max(lengths)}); they will be "
        "truncated." in out
    )
    batch, lens = next(iterate_batches(train_set, 8, limit))
    assert batch.shape == (8, limit) and lens[:, 1].max().item() == limit


# ---------------------------------------------------------------------------
# Options


def test_help_lists_mlx_lm_and_braces_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model --train --test --data --num-layers --batch-size --iters --epochs "
        "--val-batches --learning-rate --steps-per-report --steps-per-eval "
        "--save-every --adapter-path --resume --resume-adapter-file --max-seq-length "
        "--grad-checkpoint --grad-accumulation-steps --mask-prompt --optimizer --seed "
        "--report-to --rank --gate-init -c"
    ).split():
        assert f" {flag} " in out or f" {flag}\n" in out, flag


def test_yaml_and_command_line_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "batch_size: 2\nlearning_rate: 1e-2\niters: 7\nrank: 8\n"
        "lora_parameters: {rank: 4}\noptimizer_config: {adamw: {weight_decay: 0.1}}\n"
    )
    args = resolve_args({"config": str(config), "iters": 3, "model": "m"})
    assert (args.iters, args.batch_size, args.learning_rate, args.rank) == (
        3,
        2,
        1e-2,
        8,
    )
    assert args.optimizer_config == {"adamw": {"weight_decay": 0.1}}
    assert (args.steps_per_eval, args.save_every, args.num_layers) == (200, 100, -1)
    assert args.train and not args.test and args.gate_init == -2.0  # the default
    # --epochs on the command line beats iters in the YAML, and the other way round.
    assert resolve_args({"config": str(config), "epochs": 2}).epochs == 2
    config.write_text("epochs: 2\n")
    args = resolve_args({"config": str(config), "iters": 5, "model": "m"})
    assert (args.epochs, args.iters) == (None, 5)
    args = resolve_args({"config": str(config), "model": "m"})
    assert args.epochs == 2
    # No --model: the quickstart, SmolLM2-135M-Instruct on its one-word SST-2
    # question, float32 where MLX runs on the CPU.
    args = resolve_args({})
    assert (args.model, args.quickstart, args.embedded) == (
        "smollm2-135m-instruct",
        True,
        False,
    )
    assert args.data == str(EMBEDDED_MODEL.parent / "quickstart") and args.mask_prompt
    assert (Path(args.data) / "train.jsonl").is_file()
    assert (args.iters, args.learning_rate, args.gate_init) == (25, 2e-3, -3.0)
    assert (args.steps_per_eval, args.save_every, args.val_batches) == (25, 25, 2)
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert args.dequantize == ("float32" if on_cpu else None)
    assert resolve_args({"iters": 3, "gate_init": -5.0}).iters == 3  # flags win
    # --model stories260k: the embedded toy's shorter run, 4-bit, embedded data.
    args = resolve_args({"model": "stories260k"})
    assert args.embedded and not args.quickstart and args.iters < 1000
    assert (args.iters, args.learning_rate) == (200, 1e-2)
    assert (args.steps_per_eval, args.save_every) == (100, 100)
    assert args.data is None and args.dequantize is None and not args.mask_prompt
    assert args.gate_init == -5.0


def test_epochs_set_iters_and_see_every_example_once_per_epoch(tmp_path, capsys):
    data = write_data(tmp_path / "data", train=9, valid=0, test=0)
    adapter = tmp_path / "a"
    main([*EMBEDDED, "--data", str(data), "--adapter-path", str(adapter)]
         + ["--epochs", "2"])  # fmt: skip
    assert "2 epoch(s) of 2 batches: 4 iterations" in capsys.readouterr().out
    assert metrics(adapter, "train", "iteration") == [4]

    # Epoch e is a fresh permutation of the same fixed batches, from (seed, e);
    # `start` lands on the same batch a replay would.
    dataset = [([i + 1] * (3 + i % 4), 0) for i in range(10)]
    stream = list(itertools.islice(iterate_batches(dataset, 3, 64, True, seed=5), 9))
    rows = [frozenset(int(b[j, 0]) for j in range(3)) for b, _ in stream]
    epochs = [rows[0:3], rows[3:6], rows[6:9]]
    assert all(set(e) == set(epochs[0]) and len(set(e)) == 3 for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled
    assert len(set().union(*epochs[0])) == 9  # 10 examples, one left over
    resumed = itertools.islice(
        iterate_batches(dataset, 3, 64, True, seed=5, start=4), 5
    )
    for (a, la), (b, lb) in zip(stream[4:], resumed):
        assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_mask_prompt_masks_exactly_the_prompt(tmp_path):
    # stories260K with a chat template, so that completions data can be used.
    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model_dir)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    records = [{"prompt": r["text"], "completion": r["attribute"]} for r in SST2[:8]]
    data = write_data(tmp_path / "data", train=4, valid=4, test=0, records=records)
    argv = ["--model", str(model_dir), "--data", str(data), "--mask-prompt"]
    argv += ["--iters", "2", "--adapter-path", str(tmp_path / "a"), "--rank", "4"]
    main(argv)  # trains end to end on prompt-masked completions
    assert len(metrics(tmp_path / "a", "train", "train_loss")) == 1

    args = resolve_args(
        {"model": str(model_dir), "data": str(data), "mask_prompt": True}
    )
    model, tokenizer = mlx_load(str(model_dir))
    train_set, _, _ = load_datasets(args, tokenizer)
    batch, lengths = next(iterate_batches(train_set, 4, 2048))
    loss, ntoks = default_loss(model, batch, lengths)

    logits = np.array(model(batch[:, :-1]).astype(mx.float32))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for row in range(4):
        tokens = np.array(batch[row]).tolist()
        n = int(lengths[row, 1])
        # Which example is this row? Its prompt is the template up to "assistant: ".
        record = next(
            r
            for r in records[:4]
            if tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]},
                 {"role": "assistant", "content": r["completion"]}],
                return_dict=False,
            )
            == tokens[:n]
        )  # fmt: skip
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}],
            add_generation_prompt=True,
            return_dict=False,
        )
        assert tokens[: len(prompt)] == prompt and int(lengths[row, 0]) == len(prompt)
        # Targets: exactly the completion tokens (positions len(prompt)..n-1), not
        # the padding target mlx-lm's own default_loss also counts (mlx-lm#1697).
        for j in range(len(prompt) - 1, n - 1):
            total -= logp[row, j, tokens[j + 1]]
            count += 1
    assert int(ntoks) == count
    np.testing.assert_allclose(loss.item(), total / count, rtol=1e-5)


def test_test_set_of_an_attribute_adapter_is_scored_steered(tmp_path):
    """``--test`` on an attribute adapter: each test row steered by its label.

    The CLI's test loss must equal a per-row computation in float64 over the
    adapter's logits with ``steering(model, {label: 1})`` (no steering for the
    unlabelled row), and differ from the unsteered score.
    """
    from mlx_lm.tuner.datasets import TextDataset

    from mlx_braces import braced_layers, save_adapter
    from mlx_braces.steering import add_attributes, steering

    words = {"positive": ["good", "happy"], "negative": ["bad", "sad"]}
    model, tokenizer = mlx_load(str(EMBEDDED_MODEL))
    apply_braces(model, rank=4, seed=0, gate_init=0.0)
    add_attributes(model, tokenizer, words, hidden_dims=8, seed=0)
    for i, (_, m) in enumerate(braced_layers(model)):  # trained-like, nonzero h_c
        shape = m.cond.out.weight.shape
        m.cond.out.weight = 0.5 * mx.random.normal(shape, key=mx.random.key(i))
    adapter = save_adapter(model, tmp_path / "adapter", model=str(EMBEDDED_MODEL))

    records = [{"text": r["text"], "attribute": r["attribute"]} for r in SST2[:7]]
    records[6] = {"text": records[6]["text"]}  # one unlabelled test row
    data = write_data(tmp_path / "data", train=3, valid=0, test=4, records=records)
    main(["--model", str(EMBEDDED_MODEL), "--data", str(data), "--test"]
         + ["--adapter-path", str(adapter), "--batch-size", "4"])  # fmt: skip
    (got,) = metrics(adapter, "test", "test_loss")

    tested, _ = mlx_load(str(EMBEDDED_MODEL))
    load_adapter(tested, adapter)
    tested.eval()
    rows = records[3:7]
    tokens = TextDataset(rows, tokenizer)

    def score(steered: bool) -> float:
        total, count = 0.0, 0
        for i, row in enumerate(rows):
            ids, _ = tokens.process(tokens[i])
            label = row.get("attribute") if steered else None
            with steering(tested, {label: 1.0} if label else None):
                logits = tested(mx.array([ids[:-1]])).astype(mx.float32)
            logits = np.array(logits, dtype=np.float64)[0]
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            total -= sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1))
            count += len(ids) - 1
        return total / count

    want, unsteered = score(True), score(False)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert abs(want - unsteered) > 100 * 2e-5 * want  # the steering matters here


def test_batch_size_checks_and_mixed_items_are_one_clear_error():
    with pytest.raises(ValueError, match=r"^Dataset has 2 examples, fewer than "):
        next(iterate_batches([[1, 2, 3], [4, 5]], 3, 64))
    with pytest.raises(
        ValueError,
        match=r"^--batch-size 4 must be divisible by the number of processes \(3\)$",
    ):
        check_batch_size(4, 8, 3, name="--batch-size")
    check_batch_size(4, 4, 2)  # enough examples, an even split: fine
    mixed = [([1, 2], 0, [1.0]), ([3, 4, 5], 0)]
    with pytest.raises(ValueError, match="mix .* without strengths"):
        next(iterate_batches(mixed, 2, 64))
    # Strengths travel with their rows (here: sorted by length, one batch).
    items = [([7, 7, 7], 0, [0.0, 1.0]), ([5, 5], 1, [1.0, 0.0])]
    tokens, lengths, strengths = next(iterate_batches(items, 2, 64))
    assert tokens[:, 0].tolist() == [5, 7] and lengths.tolist() == [[1, 2], [0, 3]]
    assert strengths.tolist() == [[1.0, 0.0], [0.0, 1.0]]
