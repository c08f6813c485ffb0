"""The README's quickstart, run as a user would: train on the embedded default, generate.

Then an independent check that the braced model's validation loss on the embedded
validation split is lower than the base model's, both computed with mlx-lm's evaluate and the trainer's loss.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from mlx_lm.tuner.trainer import evaluate

import mlx_braces
from mlx_braces.adapters import quantize_base, read_config
from mlx_braces.trainer import default_loss

ASSETS = Path(mlx_braces.__file__).parent / "assets"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Run ``python -m mlx_braces.train`` then ``python -m mlx_braces.generate``."""
    cwd = tmp_path_factory.mktemp("quickstart")
    train = subprocess.run(
        [sys.executable, "-m", "mlx_braces.train"],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stdout + train.stderr
    generate = subprocess.run(
        [sys.executable, "-m", "mlx_braces.generate", "--max-tokens", "30"],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generate.returncode == 0, generate.stdout + generate.stderr
    return SimpleNamespace(
        cwd=cwd, train=train.stdout, generate=generate.stdout, adapters=cwd / "adapters"
    )


def test_train_says_what_it_did(quickstart):
    out = quickstart.train
    assert "Quantized the embedded model to 4 bits" in out
    assert "full precision" in out  # down_proj: 172 input dims, no 64-group fit
    assert "Trainable parameters:" in out
    assert "Iter 200: Val loss" in out
    assert (quickstart.adapters / "adapters.safetensors").is_file()
    config = read_config(quickstart.adapters)
    assert config["fine_tune_type"] == "braces"
    assert config["base_quantization"] == {"bits": 4, "group_size": 64}


def test_generate_shows_base_then_braced(quickstart):
    out = quickstart.generate
    base = out.index("base model")
    braced = out.index("with adapter")
    assert base < braced
    # Both sections generated text and printed mlx-lm's footer.
    assert out.count("Generation:") == 2


def _val_loss(model, tokenizer) -> float:
    args = SimpleNamespace(mask_prompt=False)
    _, valid, _ = load_local_dataset(ASSETS / "sst2", tokenizer, args)
    return evaluate(
        model, CacheDataset(valid), batch_size=4, num_batches=-1, loss=default_loss
    )


def test_braced_validation_loss_beats_base(quickstart):
    from mlx_lm import load as mlx_load

    base, tokenizer, config = mlx_load(str(ASSETS / "stories260K"), return_config=True)
    base, _ = quantize_base(base, config, bits=4, group_size=64)  # as trained
    base_loss = _val_loss(base, tokenizer)

    braced, tokenizer = mlx_braces.load(adapter_path=str(quickstart.adapters))
    braced_loss = _val_loss(braced, tokenizer)
    assert braced_loss < base_loss - 0.3, (braced_loss, base_loss)


def test_python_quickstart_example_runs(tmp_path):
    example = Path(__file__).parents[1] / "examples" / "quickstart.py"
    run = subprocess.run(
        [sys.executable, str(example), "--iters", "4", "--adapter-path", "qs"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Trainable parameters:" in run.stdout
    assert "  base: " in run.stdout and "braced: " in run.stdout
    assert (tmp_path / "qs" / "adapters.safetensors").is_file()
