"""Training-curve plots read the metrics.jsonl that mlx_braces' trainer writes.

The metrics come from a real (tiny) run of ``mlx_braces.trainer.train``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import build  # noqa: E402

from mlx_braces import apply_braces  # noqa: E402
from mlx_braces.plot import (  # noqa: E402
    METRICS_NAME,
    MetricsError,
    main,
    plot_metrics,
    read_metrics,
)
from mlx_braces.trainer import TrainingArgs, train  # noqa: E402

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model = apply_braces(build("llama"), rank=4, seed=0)
    mx.random.seed(0)
    data = [(mx.random.randint(3, 128, (12,)).tolist(), 0) for _ in range(8)]
    args = TrainingArgs(
        batch_size=2,
        iters=6,
        val_batches=1,
        steps_per_report=2,
        steps_per_eval=3,
        steps_per_save=100,
        max_seq_length=16,
        adapter_file=str(folder / "adapters.safetensors"),
    )
    train(model, optim.Adam(learning_rate=1e-2), data, data, args=args)
    with open(folder / METRICS_NAME, "a") as f:  # a test report, as after --test
        f.write(json.dumps({"type": "test", "test_loss": 4.0, "test_ppl": 54.6}) + "\n")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_reads_the_trainer_reports(run_dir):
    lines = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    reports = read_metrics(run_dir)
    assert reports["train"] == [x for x in lines if x["type"] == "train"]
    assert reports["val"] == [x for x in lines if x["type"] == "val"]
    assert [r["iteration"] for r in reports["train"]] == [2, 4, 6]
    assert len(reports["val"]) >= 2
    assert reports["test"][0]["test_loss"] == 4.0


def test_plot_draws_the_metrics(run_dir, tmp_path):
    reports = read_metrics(run_dir / "metrics.jsonl")
    png = tmp_path / "curves.png"
    fig = plot_metrics(reports, png)
    loss_ax, speed_ax, mem_ax = fig.axes
    train_line, val_line, test_line = loss_ax.get_lines()
    assert list(test_line.get_ydata()) == [4.0, 4.0]
    assert train_line.get_xdata().tolist() == [2, 4, 6]
    assert train_line.get_ydata().tolist() == [
        r["train_loss"] for r in reports["train"]
    ]
    assert val_line.get_xdata().tolist() == [r["iteration"] for r in reports["val"]]
    assert val_line.get_ydata().tolist() == [r["val_loss"] for r in reports["val"]]
    speed = [r["tokens_per_second"] for r in reports["train"]]
    assert speed_ax.get_lines()[0].get_ydata().tolist() == speed
    memory = [r["peak_memory"] for r in reports["train"]]
    assert mem_ax.get_lines()[0].get_ydata().tolist() == memory
    assert png_size(png) == (1500, 450)


def test_cli_writes_png(run_dir, capsys):
    main([str(run_dir)])
    assert png_size(run_dir / "metrics.png") == (1500, 450)
    assert "Wrote" in capsys.readouterr().out
    import matplotlib.image

    assert matplotlib.image.imread(run_dir / "metrics.png").shape[:2] == (450, 1500)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", " line 2: not valid JSON"),
        ("[1, 2]", " line 2: expected a JSON object, got list"),
        ('{"iteration": 3}', " line 2: expected a string 'type'"),
        (
            '{"type": "train", "iteration": 3}',
            " line 2: train report needs a finite number",
        ),
        ('{"type": "val", "iteration": 3, "val_loss": NaN}', "'val_loss', got nan"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, capsys, line, message):
    good = {"type": "val", "iteration": 0, "val_loss": 3.0, "val_time": 0.1}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(MetricsError, match="metrics.jsonl" + ".*" + message[:8]):
        read_metrics(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {tmp_path / 'metrics.jsonl'}") and message in err


def test_missing_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 1
    assert "metrics.jsonl: not found" in capsys.readouterr().err


def test_val_only_run_plots(tmp_path):
    """A run that only validated (e.g. --iters 0) still gets a picture."""
    rows = [{"type": "val", "iteration": 0, "val_loss": 3.0, "val_time": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_metrics(read_metrics(tmp_path), tmp_path / "out.png")
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == [3.0]
    assert png_size(tmp_path / "out.png") == (1500, 450)
