"""CI's real-model test: SmolLM2-135M-Instruct from its GGUF, end to end.

Converted once into the user's cache (``real_models``), it generates the same greedy
text through mlx_braces as through mlx-lm, trains braces for 3 steps through the CLI,
and the adapter loaded by name in a fresh process reproduces the trainer's last
validation loss. Quantized matmuls run at ~2 GFLOP/s on a CPU: sequences are short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from real_models import smollm2_dir as smollm2_dir  # noqa: E402

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TRAIN = [
    "The film was a delight from start to finish.",
    "A dull, lifeless movie with nothing to say.",
    "The actors were wonderful and the story moved me.",
    "I walked out before the end; it was that bad.",
]
VALID = ["A warm and funny film that I will watch again."]


def test_greedy_generation_matches_mlx_lm(smollm2_dir):
    import mlx_lm

    from mlx_braces import generate, load

    model, tokenizer = load("SmolLM2-135M-Instruct")  # by name, from the cache
    ref_model, ref_tokenizer = mlx_lm.load(str(smollm2_dir))
    prompt = "The capital of France is"
    ours = generate(model, tokenizer, prompt, max_tokens=8)
    ref = mlx_lm.generate(ref_model, ref_tokenizer, prompt, max_tokens=8)
    assert ours == ref
    assert "Paris" in ours, ours


LOSS_SCRIPT = """
import json, sys
from mlx_braces import load
from mlx_braces.train import build_parser, load_datasets, resolve_args
from mlx_braces.trainer import default_loss, evaluate, iterate_batches

args = resolve_args(vars(build_parser().parse_args(json.loads(sys.argv[1]))))
model, tokenizer = load(adapter_path=args.adapter_path)
_, valid, _ = load_datasets(args, tokenizer)
loss = evaluate(model, valid, 1, 1, args.max_seq_length, default_loss, iterate_batches)
print(json.dumps({"val_loss": float(loss)}))
"""


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, lines in (("train", TRAIN), ("valid", VALID)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in lines)
    return folder


def test_train_save_and_reload_by_name(smollm2_dir, data, tmp_path):
    adapters = tmp_path / "adapters"
    argv = [
        "--model",
        "smollm2-135m-instruct",
        "--data",
        str(data),
        "--adapter-path",
        str(adapters),
        "--iters",
        "3",
        "--batch-size",
        "1",
        "--max-seq-length",
        "32",
        "--num-layers",
        "2",
        "--rank",
        "4",
        "--gate-init",
        "0",
        "--learning-rate",
        "3e-2",
        "--steps-per-report",
        "1",
        "--steps-per-eval",
        "3",
        "--val-batches",
        "1",
        "--save-every",
        "3",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_braces.train", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Iter 3: Val loss" in r.stdout, r.stdout
    # a quantized base on the CPU, without --dequantize: the one-line hint
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert ("--dequantize trains in float32" in r.stdout) == on_cpu, r.stdout
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["model"] == "smollm2-135m-instruct"
    assert config["base_gguf_sha256"] == SMOLLM2_SHA
    rows = [json.loads(line) for line in open(adapters / "metrics.jsonl")]
    val = {row["iteration"]: row["val_loss"] for row in rows if row["type"] == "val"}
    assert set(val) == {0, 3}
    assert abs(val[3] - val[0]) > 1e-2, val  # the braces did move

    # A fresh process: the base is resolved from the recorded name, the adapter
    # applied, and the validation loss is the one the trained model had.
    r = subprocess.run(
        [sys.executable, "-c", LOSS_SCRIPT, json.dumps(argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])["val_loss"]
    assert loaded == pytest.approx(val[3], rel=1e-5, abs=1e-5), (loaded, val)
