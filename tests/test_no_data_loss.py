"""No failed run damages the adapter already in its folder (issue 14).

A good rank-4 adapter, then runs into its folder that fail: a NaN at step 1, a real
SIGKILL at chosen instants (``$MLX_BRACES_TEST_KILL_AT``, see mlx_braces.commit), a
disk that fills up (a tiny tmpfs) and a write the kernel refuses (RLIMIT_FSIZE). After
each, the folder must hold the old adapter byte for byte, or the new run's first
checkpoint, exactly as an uninterrupted run writes it; both load.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_braces import load
from mlx_braces.adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_parameters
from mlx_braces.commit import JOURNAL_NAME, KILL_ENV, locked
from mlx_braces.train import EMBEDDED_DATA, main

os.environ["HF_HUB_OFFLINE"] = "1"
TEMP = re.compile(r"^\.[a-z0-9_]+\.[a-z0-9_]{8}\.[a-z]+$")  # commit's temporary names


def run_args(data: Path, folder: Path, rank: int, iters: int) -> list[str]:
    """A short run of the embedded stories260k (no download) on ``data``."""
    argv = ["--model", "stories260k", "--data", str(data), "--adapter-path"]
    argv += [str(folder), "--rank", str(rank), "--iters", str(iters)]
    argv += ["--save-every", "2", "--max-seq-length", "32"]
    return argv + ["--steps-per-report", "1", "--seed", str(rank)]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (temporary files left by a kill excluded)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not TEMP.match(p.name)
    }


def weights(file: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(file)).items()}


def loaded_weights(folder: Path) -> dict[str, np.ndarray]:
    """Load the adapter as a user would (its recorded base) and return its tensors."""
    model, _ = load(adapter_path=str(folder))
    return {k: np.array(v) for k, v in adapter_parameters(model).items()}


def train_cli(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m mlx_braces.train``: runs compared bit for bit all use a process of
    their own (one process's BLAS may not be another's; see mlx_braces.blas)."""
    return subprocess.run(
        [sys.executable, "-m", "mlx_braces.train", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A good rank-4 adapter, and the rank-8 run that later fails, uninterrupted."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "data"
    data.mkdir()
    lines = (EMBEDDED_DATA / "train.jsonl").read_text().splitlines()[:8]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    good, new = root / "good", root / "new"
    main(run_args(data, good, rank=4, iters=2))
    proc = train_cli(run_args(data, new, rank=8, iters=4))
    assert proc.returncode == 0, proc.stderr
    return {"data": data, "good": good, "new": new, "root": root}


@pytest.fixture
def victim(runs, tmp_path):
    """A copy of the good adapter for a failing run to target."""
    folder = tmp_path / "adapter"
    shutil.copytree(runs["good"], folder)
    return folder


def assert_old(folder: Path, runs, leftovers_ok: bool = True) -> None:
    """``folder`` holds the good adapter exactly (files, bytes) and it loads."""
    assert contents(folder) == contents(runs["good"])
    if not leftovers_ok:
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in runs["good"].iterdir()
        )
    expected = weights(runs["good"] / WEIGHTS_NAME)
    got = loaded_weights(folder)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in got)


def assert_new(folder: Path, runs) -> None:
    """``folder`` holds the new run's iteration-2 checkpoint, readable as one set."""
    expected = weights(runs["new"] / "0000002_adapters.safetensors")
    got = loaded_weights(folder)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in got)


def kill_run(runs, folder: Path, point: str) -> subprocess.CompletedProcess:
    argv = run_args(runs["data"], folder, rank=8, iters=4)
    proc = train_cli(argv, env={**os.environ, KILL_ENV: point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def test_nan_at_step_1_leaves_the_folder_as_it_was(runs, victim, capsys):
    argv = run_args(runs["data"], victim, rank=8, iters=4)
    with pytest.raises(SystemExit) as e:
        main(argv + ["--learning-rate", "1e38"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "at iteration 1; no checkpoint had been saved yet" in err
    assert_old(victim, runs, leftovers_ok=False)


# (instant, what the folder must hold): before the commit point the old adapter,
# after it the new run's first checkpoint.
KILLS = [
    ("step@1", "old"),  # set up, about to take the first step
    ("write:0000002_adapters.safetensors@2", "old"),  # first file of the save
    ("write:adapters.safetensors@2", "old"),  # mid-save
    ("write:metrics.jsonl@2", "old"),  # every file written, journal not yet
    ("journal@2", "new"),  # just after the commit point, nothing renamed
    ("rename:adapters.safetensors@2", "new"),  # new weights beside the old config
    ("done@2", "new"),  # the commit complete
    ("step@3", "new"),  # between saves
    ("write:adapters.safetensors@4", "new"),  # during the second save
]


@pytest.mark.parametrize("point, holds", KILLS, ids=[k for k, _ in KILLS])
def test_sigkill_leaves_the_old_adapter_or_the_new_one(runs, victim, point, holds):
    kill_run(runs, victim, point)
    if holds == "old":
        assert_old(victim, runs, leftovers_ok=point != "step@1")
        return
    assert_new(victim, runs)
    config = json.loads(
        (victim / CONFIG_NAME).read_text()
        if not (victim / JOURNAL_NAME).exists()
        else "{}"
    )
    if config:  # no commit pending: the top-level pair is the new adapter (mlx-lm)
        assert config["braces_parameters"]["rank"] == 8


def test_a_cut_commit_resumes_exactly(runs, victim):
    """Killed between the renames of the first commit, --resume ends like no kill."""
    kill_run(runs, victim, "rename:adapters.safetensors@2")
    assert (victim / JOURNAL_NAME).exists()
    on_disk = json.loads((victim / CONFIG_NAME).read_text())
    assert on_disk["braces_parameters"]["rank"] == 4  # the old config, not renamed
    proc = train_cli(run_args(runs["data"], victim, rank=8, iters=4) + ["--resume"])
    assert proc.returncode == 0, proc.stderr
    assert not (victim / JOURNAL_NAME).exists()
    assert not [p for p in victim.iterdir() if TEMP.match(p.name)]
    expected = weights(runs["new"] / WEIGHTS_NAME)
    got = weights(victim / WEIGHTS_NAME)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    metrics = [json.loads(line) for line in open(victim / "metrics.jsonl")]
    assert [r["iteration"] for r in metrics] == [1, 2, 3, 4]
    assert (
        json.loads((victim / CONFIG_NAME).read_text())["braces_parameters"]["rank"] == 8
    )


def test_resume_with_nothing_left_changes_nothing(runs, victim, capsys):
    before = contents(victim)
    main(run_args(runs["data"], victim, rank=4, iters=2) + ["--resume"])
    assert "nothing left to train" in capsys.readouterr().out
    assert contents(victim) == before
    assert sorted(p.name for p in victim.iterdir()) == sorted(before)


def test_a_second_writer_is_refused(runs, victim, capsys):
    with locked(victim):
        with pytest.raises(SystemExit) as e:
            main(run_args(runs["data"], victim, rank=8, iters=4))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "another process is writing to this adapter folder" in err
    assert_old(victim, runs, leftovers_ok=False)


def test_another_kind_of_adapter_is_kept_unless_overwrite(runs, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    config = {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": {}}
    (lora / CONFIG_NAME).write_text(json.dumps(config))
    mx.save_safetensors(str(lora / WEIGHTS_NAME), {"x": mx.zeros((2,))})
    before = contents(lora)
    argv = run_args(runs["data"], lora, rank=8, iters=2)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"{lora / CONFIG_NAME}: the folder holds a lora adapter, not braces" in err
    assert "--overwrite" in err and err.count("\n") == 1
    assert contents(lora) == before
    assert train_cli(argv + ["--overwrite"]).returncode == 0
    expected = weights(runs["new"] / "0000002_adapters.safetensors")
    got = loaded_weights(lora)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str):
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    try:
        ok = subprocess.run(mount, capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk_at_the_first_save_keeps_the_old_adapter(runs, tmp_path, capsys):
    # 64 KiB: the good adapter takes 44 KiB of pages, the new run's save needs more.
    with tiny_tmpfs(tmp_path / "disk", "64k") as disk:
        folder = disk / "adapter"
        shutil.copytree(runs["good"], folder)
        with pytest.raises(SystemExit) as e:
            main(run_args(runs["data"], folder, rank=8, iters=4))
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"cannot save the checkpoint of iteration 2 in {folder}" in err
        assert "the folder's previous contents are unchanged" in err
        assert_old(folder, runs, leftovers_ok=False)


def test_a_refused_write_keeps_the_old_adapter(runs, victim):
    """RLIMIT_FSIZE: the kernel refuses every write past 10 kB (EFBIG), no root needed."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    proc = train_cli(run_args(runs["data"], victim, rank=8, iters=4), preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith(
        f"Error: cannot save the checkpoint of iteration 2 in {victim}"
    )
    assert_old(victim, runs, leftovers_ok=False)
