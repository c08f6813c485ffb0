"""MLX on a Linux CPU: matmul speed per BLAS and dtype, and one braces training step.

    python scripts/bench_cpu.py                       # SmolLM2-135M (fetched once)
    python scripts/bench_cpu.py --model DIR_OR_GGUF --repeats 5 --steps 3

Matmuls (GFLOP/s): fp32, bf16, fp16 and 4-bit ``quantized_matmul`` at 1024³ and at
SmolLM2-135M's FFN shape for a batch of 4 × 64 tokens (256 × 576 @ 576 × 1536), with
MLX's bundled reference BLAS and with the OpenBLAS that ``import mlx_braces`` loads,
each in its own process (the BLAS is bound when mlx.core is imported), plus numpy.
Training: one braces step (rank 16, batch 4 × 64, Adam, orthonormalize) on the 4-bit
model, and on the model dequantized to fp32 with each BLAS (and to bf16 with OpenBLAS).
Every figure is a median over repeats, and ratios compare runs of the same invocation:
the machine may be shared, so absolute figures move with its load (recorded).
Results: a table, and JSON in runs/bench_cpu-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from smollm2_shape import SMOLLM2_135M  # the shapes of RANDOM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a source checkout

SHAPES = {"1024³": (1024, 1024, 1024), "256×576×1536": (256, 576, 1536)}  # M, K, N
DTYPES = ("float32", "bfloat16", "float16", "q4")
RANDOM = "random:smollm2-135m"
# (name, BLAS, dequantize dtype or None for the 4-bit model)
TRAIN_VARIANTS = (
    ("4-bit", "openblas", None),
    ("fp32, bundled BLAS", "bundled", "float32"),
    ("fp32, OpenBLAS", "openblas", "float32"),
    ("bf16, OpenBLAS", "openblas", "bfloat16"),
)


def _timed(fn, repeats: int, min_seconds: float = 0.05) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timings of >= min_seconds."""
    fn()  # warm-up
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(min_seconds / once))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def worker_matmul(repeats: int) -> dict:
    """GFLOP/s of each shape × dtype on this process's BLAS, and numpy's fp32."""
    import mlx_braces  # first: the BLAS that MLX_BRACES_BLAS says

    # isort: split
    import mlx.core as mx
    import numpy as np

    rows = {}
    for shape, (m, k, n) in SHAPES.items():
        flops = 2 * m * k * n
        x32 = mx.random.normal((m, k), key=mx.random.key(0))
        w32 = mx.random.normal((n, k), key=mx.random.key(1)) / k**0.5  # (N, K)
        for dtype in DTYPES:
            if dtype == "q4":
                wq, scales, biases = mx.quantize(w32, group_size=64, bits=4)
                args = (x32, wq, scales, biases)

                def run(args=args):
                    mx.eval(mx.quantized_matmul(*args, group_size=64, bits=4))
            else:
                x, wt = (a.astype(getattr(mx, dtype)) for a in (x32, w32.T))
                mx.eval(x, wt)

                def run(x=x, wt=wt):
                    mx.eval(x @ wt)

            rows[f"{dtype} {shape}"] = flops / _timed(run, repeats) / 1e9
        a, b = np.array(x32), np.ascontiguousarray(np.array(w32).T)
        rows[f"numpy float32 {shape}"] = (
            flops / _timed(lambda a=a, b=b: a @ b, repeats) / 1e9
        )
    return {
        "blas": mlx_braces.blas.mlx_cblas_library(),
        "gflops": rows,
    }


def worker_train(model_path: str, dequantize: str | None, steps: int) -> dict:
    """Seconds per braces training step (rank 16, batch 4 × 64) and peak memory."""
    import mlx_braces  # first: the BLAS that MLX_BRACES_BLAS says

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load

    from mlx_braces import apply_braces, orthonormalize
    from mlx_braces.quantize import dequantize_model, is_quantized, quantize_base

    if model_path == RANDOM:
        from mlx_lm.models import llama

        config = dict(SMOLLM2_135M)
        model = llama.Model(llama.ModelArgs.from_dict(config))
    else:
        model, _, config = load(model_path, return_config=True)
    if not is_quantized(model):
        model, config = quantize_base(model, config, bits=4, group_size=64)
    if dequantize:
        dequantize_model(model, dequantize)
    mx.eval(model.parameters())
    apply_braces(model, rank=16, seed=0)
    vocab = config["vocab_size"]
    tokens = mx.random.randint(1, vocab, (4, 65), key=mx.random.key(0))  # (B, L + 1)

    def loss_fn(m, t):
        return nn.losses.cross_entropy(m(t[:, :-1]), t[:, 1:]).astype(mx.float32).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=1e-3)
    model.train()
    times, losses = [], []
    mx.reset_peak_memory()
    for _ in range(steps + 1):  # the first step is the warm-up
        t = time.perf_counter()
        loss, grads = loss_and_grad(model, tokens)
        opt.update(model, grads)
        orthonormalize(model)
        mx.eval(loss, model.parameters(), opt.state)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {
        "blas": mlx_braces.blas.mlx_cblas_library(),
        "seconds_per_step": statistics.median(times[1:]),
        "step_times": times,
        "tokens_per_second": 4 * 64 / statistics.median(times[1:]),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "loss": losses,
    }


def spawn(blas: str, *worker_args: str, timeout: float = 3600) -> dict:
    """Run a worker of this script in a fresh process with BLAS ``bundled``/``openblas``."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_BRACES_BLAS"}
    if blas == "bundled":
        env["MLX_BRACES_BLAS"] = "off"
    r = subprocess.run(
        [sys.executable, __file__, "--worker", *worker_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        sys.exit(f"worker {worker_args} ({blas}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help=f"name, GGUF or folder ({RANDOM}: random weights of SmolLM2-135M's shapes)",
    )
    p.add_argument("--repeats", type=int, default=5, help="matmul timings per median")
    p.add_argument("--steps", type=int, default=2, help="timed training steps")
    p.add_argument("--out", help="JSON file (default runs/bench_cpu-<time>.json)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "matmul":
            out = worker_matmul(int(rest[0]))
        else:
            out = worker_train(
                rest[0], rest[1] if rest[1] != "-" else None, int(rest[2])
            )
        print(json.dumps(out))
        return

    from mlx_braces.models import resolve_model

    try:
        model = resolve_model(args.model) if args.model != RANDOM else RANDOM
    except (ImportError, ValueError, OSError) as e:
        if args.model != "smollm2-135m-instruct":
            sys.exit(f"Error: --model {args.model}: {e}")
        print(f"Note: {args.model} unavailable ({e}); random weights, same shapes")
        model = RANDOM
    load_before = os.getloadavg()
    tic = time.perf_counter()
    matmul = {
        blas: spawn(blas, "matmul", str(args.repeats))
        for blas in ("bundled", "openblas")
    }
    train = {
        name: spawn(blas, "train", model, dq or "-", str(args.steps))
        for name, blas, dq in TRAIN_VARIANTS
    }
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": args.model if model != RANDOM else f"{RANDOM} (random weights)",
        "model_path": model,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "seconds": time.perf_counter() - tic,
        "matmul": matmul,
        "train": train,
    }

    print(
        f"matmul GFLOP/s (median of {args.repeats}); BLAS bound to MLX's cblas_sgemm:"
    )
    for blas, r in matmul.items():
        print(f"  {blas}: {r['blas']}")
    print(f"{'':26}{'bundled':>10}{'OpenBLAS':>10}{'ratio':>8}")
    for key, bundled in matmul["bundled"]["gflops"].items():
        fast = matmul["openblas"]["gflops"][key]
        print(f"{key:<26}{bundled:>10.1f}{fast:>10.1f}{fast / bundled:>7.1f}×")
    base = train["4-bit"]["seconds_per_step"]
    print(
        f"\nbraces training step, {results['model']}, rank 16, batch 4 × 64 "
        f"(median of {args.steps} after a warm-up):"
    )
    print(f"{'':22}{'s/step':>9}{'tok/s':>9}{'vs 4-bit':>10}{'peak GB':>9}")
    for name, r in train.items():
        s = r["seconds_per_step"]
        print(
            f"{name:<22}{s:>9.2f}{r['tokens_per_second']:>9.1f}{base / s:>9.1f}×"
            f"{r['peak_memory_gb']:>9.2f}"
        )
    print(
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"on {os.cpu_count()} CPUs"
    )
    out = Path(
        args.out or ROOT / "runs" / f"bench_cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
