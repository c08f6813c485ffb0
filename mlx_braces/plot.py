"""Training curves of a braces run: ``python -m mlx_braces.plot ADAPTER_DIR``.

Reads the ``metrics.jsonl`` the trainer writes into the adapter folder (one JSON
object per line, ``"type"`` train/val/test plus mlx-lm's report keys) and draws
train/val loss, tokens per second and peak memory against the iteration.
matplotlib is an optional extra (``pip install 'mlx-braces[plot]'``); figures are
drawn without pyplot, so no global backend is switched.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .adapters import METRICS_NAME
from .data import read_jsonl

DPI = 100  # every figure's PNG is 100 pixels per inch of its size
METRICS_FIGSIZE = (15.0, 4.5)  # inches: 1500 x 450 pixels

# Keys each report type must carry (mlx-lm's training callback reports).
REQUIRED = {
    "train": ("iteration", "train_loss", "tokens_per_second", "peak_memory"),
    "val": ("iteration", "val_loss"),
}


class MetricsError(ValueError):
    """A metrics file that is missing or has a malformed line."""


class PlotUnavailable(ValueError):
    """matplotlib, an optional extra, is not installed."""


def require_matplotlib(what: str = "plotting") -> None:
    """Raise :class:`PlotUnavailable` with the install hint if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            f"{what} needs matplotlib: pip install 'mlx-braces[plot]'"
        ) from None


def new_figure(size: tuple[float, float], what: str = "plotting"):
    """A matplotlib ``Figure`` of ``size`` inches at :data:`DPI` (constrained layout)."""
    require_matplotlib(what)
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def finish(fig, file: str | Path | None):
    """Save ``fig`` as a PNG to ``file`` if one is given; returns ``fig``."""
    if file is not None:
        fig.savefig(file)
    return fig


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Reports by type (``train``, ``val``, ...) from a ``metrics.jsonl`` file or its folder.

    Every line must be a JSON object with a string ``type``; ``train`` and ``val``
    lines must carry finite numbers under their keys. Errors name the file and line.
    """
    file = Path(path)
    current = file
    if file.is_dir():
        from .commit import resolve

        file = file / METRICS_NAME
        current = resolve(file.parent, METRICS_NAME)  # through a cut commit's journal
    if not current.is_file():
        raise MetricsError(f"{file}: not found (train with mlx_braces.train first)")
    reports: dict[str, list[dict[str, Any]]] = {}
    for where, report in read_jsonl(current, MetricsError, name=file):
        if not isinstance(report.get("type"), str):
            raise MetricsError(f"{where}: expected a string 'type'")
        kind = report["type"]
        for key in REQUIRED.get(kind, ()):
            if not _number(report.get(key)):
                raise MetricsError(
                    f"{where}: {kind} report needs a finite number under "
                    f"'{key}', got {report.get(key)!r}"
                )
        reports.setdefault(kind, []).append(report)
    if not reports.get("train") and not reports.get("val"):
        raise MetricsError(f"{file}: no train or val reports to plot")
    return reports


def plot_metrics(reports: dict[str, list[dict[str, Any]]], file: str | Path | None):
    """Draw loss (test loss dashed), tokens/s and peak memory (GB) against iteration.

    Saves a PNG to ``file`` when given; returns the matplotlib ``Figure`` (1500 x 450
    pixels).
    """
    fig = new_figure(METRICS_FIGSIZE)
    from matplotlib.ticker import MaxNLocator

    train = reports.get("train", [])
    val = reports.get("val", [])
    loss_ax, speed_ax, mem_ax = fig.subplots(1, 3)

    def series(rows, key):
        return [r["iteration"] for r in rows], [r[key] for r in rows]

    if train:
        loss_ax.plot(*series(train, "train_loss"), label="train", marker=".")
    if val:
        loss_ax.plot(*series(val, "val_loss"), label="validation", marker="o")
    tests = [
        r["test_loss"] for r in reports.get("test", []) if _number(r.get("test_loss"))
    ]
    if tests:
        loss_ax.axhline(tests[-1], color="C4", linestyle="--", label="test")
    loss_ax.set(title="Loss", xlabel="iteration", ylabel="loss")
    loss_ax.legend()
    speed_ax.plot(*series(train, "tokens_per_second"), color="C2", marker=".")
    speed_ax.set(title="Throughput", xlabel="iteration", ylabel="tokens / s")
    mem_ax.plot(*series(train, "peak_memory"), color="C3", marker=".")
    mem_ax.set(title="Peak memory", xlabel="iteration", ylabel="GB")
    for ax in (loss_ax, speed_ax, mem_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return finish(fig, file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_braces.plot",
        description="Plot the training curves a braces run logged to metrics.jsonl.",
    )
    parser.add_argument(
        "adapter_path", help="Adapter folder (or metrics.jsonl file) of a run."
    )
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="PNG file to write (default: ADAPTER_PATH/metrics.png).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = Path(args.adapter_path)
    output = args.output or (path if path.is_dir() else path.parent) / "metrics.png"
    try:
        require_matplotlib("mlx_braces.plot")
        if Path(output).is_dir():
            raise MetricsError(
                f"{output}: is a folder; give a file name, e.g. {Path(output) / 'metrics.png'}"
            )
        reports = read_metrics(path)
        try:
            plot_metrics(reports, output)
        except OSError as e:
            raise MetricsError(f"{output}: cannot write ({e})") from None
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
