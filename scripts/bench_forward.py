"""Forward-pass cost of braces: braced (rank 16) vs unbraced, same weights, same run.

A random quantized model of Llama proportions (default: d=2048, d_ff=5632, 8 layers,
16 heads, 4 KV heads, vocab 32000, 4-bit affine, bfloat16 on a GPU and float32 on the
CPU) is built once; a second model shares its weight arrays and is braced. Prompt processing and decoding
run through mlx-lm's ``generate_step`` (KV cache, greedy sampler) and are timed the way
``mlx_lm.stream_generate`` reports them: prompt tokens/s up to the first token, then
generated tokens/s. Repetitions alternate ABAB and the median is reported. Peak memory
is measured per configuration in a fresh subprocess (only that model in memory).

Usage::

    python scripts/bench_forward.py [--hidden-size 2048 --intermediate-size 5632
        --layers 8 --heads 16 --kv-heads 4 --vocab 32000 --bits 4 --group-size 64
        --dtype float32|float16|bfloat16 --rank 16 --prompt-tokens 512 --decode-tokens 128
        --repeats 3 --out runs/bench_forward.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

try:
    from mlx_braces.braces import apply_braces
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mlx_braces.braces import apply_braces

CONFIGS = ("unbraced", "braced")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--intermediate-size", type=int, default=5632)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="default: bfloat16 on a GPU, float32 on the CPU (MLX's CPU bf16 is slow)",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gate-init", type=float, default=0.0, help="ĝ (0: g = 0.5)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_forward.json")
    p.add_argument("--memory-only", choices=CONFIGS, help=argparse.SUPPRESS)
    return p


def model_args(args) -> llama.ModelArgs:
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )


def skeleton(args) -> nn.Module:
    """A quantized Llama whose (lazy, never evaluated) weights are to be replaced."""
    model = llama.Model(model_args(args))
    model.set_dtype(getattr(mx, args.dtype))
    nn.quantize(model, group_size=args.group_size, bits=args.bits)
    return model


def build_base(args) -> nn.Module:
    """Random quantized base model (mlx-lm's default initialisation, from ``seed``)."""
    mx.random.seed(args.seed)
    model = skeleton(args)
    mx.eval(model.parameters())
    model.eval()  # as mlx_lm.load leaves it
    return model


def braced_twin(args, base: nn.Module) -> nn.Module:
    """A braced model sharing ``base``'s weight arrays (no second copy in memory)."""
    model = skeleton(args)
    model.update(base.parameters())
    model.eval()
    apply_braces(model, rank=args.rank, gate_init=args.gate_init, seed=args.seed)
    mx.eval(model.parameters())
    return model


def run_once(model: nn.Module, prompt: mx.array, decode_tokens: int) -> dict:
    """Prompt and decode tokens/s, measured as ``mlx_lm.stream_generate`` does."""
    tic = time.perf_counter()
    steps = generate_step(prompt, model, max_tokens=decode_tokens)
    for n, _ in enumerate(steps):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            tic = time.perf_counter()
    decode_time = time.perf_counter() - tic
    return {
        "prompt_tps": prompt.size / prompt_time,
        "decode_tps": n / decode_time,  # tokens after the first one
    }


def measure_memory(args, config: str) -> float:
    """Peak memory (GB) of prefill + decode in a process holding only one model."""
    model = build_base(args)
    if config == "braced":
        model = braced_twin(args, model)
    prompt = mx.random.randint(0, args.vocab, (args.prompt_tokens,))
    run_once(model, prompt[:8], 4)  # warm-up (and A cache)
    mx.clear_cache()
    mx.reset_peak_memory()
    run_once(model, prompt, args.decode_tokens)
    return mx.get_peak_memory() / 1e9


def memory_in_subprocess(argv: list[str], config: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-only", config],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.dtype is None:
        gpu = mx.default_device() == mx.gpu
        args.dtype = "bfloat16" if gpu else "float32"
        argv = [*argv, "--dtype", args.dtype]
    if args.memory_only:
        print(measure_memory(args, args.memory_only))
        return {}

    base = build_base(args)
    models = {"unbraced": base, "braced": braced_twin(args, base)}
    prompt = mx.random.randint(0, args.vocab, (args.prompt_tokens,))
    for m in models.values():  # warm-up
        run_once(m, prompt[:8], 4)
    runs = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):  # ABAB: drift on a shared machine hits both alike
        for c in CONFIGS:
            runs[c].append(run_once(models[c], prompt, args.decode_tokens))
    del models, base
    mx.clear_cache()
    memory = {c: memory_in_subprocess(argv, c) for c in CONFIGS}

    results = {}
    for c in CONFIGS:
        speeds = {k: [r[k] for r in runs[c]] for k in runs[c][0]}
        results[c] = (
            {k: statistics.median(v) for k, v in speeds.items()}
            | {f"best_{k}": max(v) for k, v in speeds.items()}  # least disturbed run
            | {"peak_memory_gb": memory[c], "runs": runs[c]}
        )
    ratio = {
        k: results["braced"][k] / results["unbraced"][k]
        for k in ("prompt_tps", "decode_tps", "peak_memory_gb")
        + ("best_prompt_tps", "best_decode_tps")
    }

    print(
        f"Llama d={args.hidden_size} d_ff={args.intermediate_size} "
        f"layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"{args.bits}-bit g{args.group_size} {args.dtype}, braces rank {args.rank}; "
        f"prompt {args.prompt_tokens}, decode {args.decode_tokens}, "
        f"median of {args.repeats} (ABAB), device {mx.default_device()}"
    )
    print(f"{'':10} {'prompt tok/s':>13} {'decode tok/s':>13} {'peak mem GB':>12}")
    for c in CONFIGS:
        r = results[c]
        print(
            f"{c:10} {r['prompt_tps']:13.1f} {r['decode_tps']:13.2f} "
            f"{r['peak_memory_gb']:12.3f}"
        )
    print(
        f"{'ratio':10} {ratio['prompt_tps']:13.3f} {ratio['decode_tps']:13.3f} "
        f"{ratio['peak_memory_gb']:12.3f}"
    )
    print(
        f"{'ratio best':10} {ratio['best_prompt_tps']:13.3f} "
        f"{ratio['best_decode_tps']:13.3f}   (fastest run of each)"
    )

    report = {
        "config": vars(args) | {"device": str(mx.default_device())},
        "results": results,
        "ratio_braced_over_unbraced": ratio,
        "goal": {"decode_tps": ">= 0.97", "peak_memory_gb": "<= 1.02"},
        "command": " ".join(["python", "scripts/bench_forward.py", *argv]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {out}")
    return report


if __name__ == "__main__":
    main()
