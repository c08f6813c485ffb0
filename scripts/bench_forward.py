"""Inference cost of braces and of LoRA at the same rank, against the unbraced model.

Every model is run in three variants built from the same weights: ``unbraced``,
``braced`` (``apply_braces``, rank r, gate ``g = sigmoid(gate_init)``) and ``lora``
(mlx-lm's ``linear_to_lora_layers``, rank r on ``self_attn.q_proj``/``v_proj``).
Prompt processing and decoding run through mlx-lm's ``generate_step`` (KV cache, greedy)
and are timed as ``mlx_lm.stream_generate`` reports them: prompt tokens/s up to the
first token, then generated tokens/s; both per wall-clock second and per second of
process CPU time (``time.process_time``, less sensitive to other processes on a shared
machine). Each repeat runs every variant once, consecutively and in a rotated order,
so drift hits all alike; a variant's ratio to ``unbraced`` is taken within each repeat
and reported as the median and inter-quartile range over repeats.

Models (``--models``, several allowed):

- ``smollm2``: SmolLM2-135M-Instruct, 4-bit (its Q4_1 GGUF through
  ``mlx_braces.models.resolve_model``); ``smollm2:fp32`` the same, dequantized exactly.
  Without the converter (or offline) a random model of SmolLM2's shape stands in and
  the row says ``(random weights)``.
- ``random``: a random 4-bit Llama from ``--hidden-size`` ... (default d=2048,
  d_ff=5632, 8 layers, 16/4 heads, vocab 32000); ``random:fp32`` unquantized.
- ``moe`` (or ``--moe``): a random 4-bit Qwen3-MoE (every block routed experts;
  ``--moe-hidden-size`` ..., default d=1024, 64 experts of width 384, top 8, 8 layers,
  16/4 heads of 64, vocab 32000: Qwen3-30B-A3B at half its width, half its experts
  and 8 of its 48 layers);
  ``moe:fp32`` unquantized. With ``--ffn-calls`` its layer-0 MoE block is also timed
  with the brace's exact per-row (train-mode) path, the alternative to the cached ``A``.
- any mlx-lm folder or ``.gguf`` file (``PATH`` or ``PATH:fp32``).

Peak memory per (model, variant) is measured in a fresh subprocess (``--no-memory``
skips it).

Usage::

    python scripts/bench_forward.py [--models smollm2 smollm2:fp32 random]
        [--rank 16 --prompt-tokens 128 --decode-tokens 64 --repeats 9]
        [--out runs/bench_forward.json]
    python scripts/bench_forward.py --moe [--ffn-calls 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout


import mlx_braces  # noqa: E402, F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama, qwen3_moe  # noqa: E402
from smollm2_shape import SMOLLM2_135M  # noqa: E402

from mlx_braces.braces import apply_braces  # noqa: E402


def blas_name() -> str:
    """The BLAS MLX's matmuls call (a reference BLAS makes fp32 speeds meaningless)."""
    try:
        from mlx_braces.blas import mlx_cblas_library

        return Path(mlx_cblas_library() or "unknown").name
    except ImportError:
        return "unknown"


BLAS = blas_name()

VARIANTS = ("unbraced", "braced", "lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "smollm2:fp32", "random"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--intermediate-size", type=int, default=5632)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--moe", action="store_true", help="--models moe (see above)")
    p.add_argument("--moe-hidden-size", type=int, default=1024)
    p.add_argument("--moe-intermediate-size", type=int, default=384)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--bits", type=int, default=4, help="random models' quantization")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="braces and LoRA rank")
    p.add_argument("--gate-init", type=float, default=0.0, help="ĝ (0: g = 0.5)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument(
        "--ffn-calls",
        type=int,
        default=0,
        help="also time N one-token calls of layer 0's FFN alone (steadier than decoding)",
    )
    p.add_argument("--out", default="runs/bench_forward.json")
    p.add_argument("--memory-only", nargs=2, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------
# Models


def random_llama(args, shape: dict, quantize: bool) -> nn.Module:
    """A random Llama (mlx-lm's initialisation, from ``--seed``), 4-bit or fp32."""
    mx.random.seed(args.seed)
    model = llama.Model(
        llama.ModelArgs(**{"model_type": "llama", "rms_norm_eps": 1e-5, **shape})
    )
    if quantize:
        nn.quantize(model, group_size=args.group_size, bits=args.bits)
    mx.eval(model.parameters())
    return model


def random_moe(args, quantize: bool) -> nn.Module:
    """A random Qwen3-MoE (mlx-lm's initialisation, from ``--seed``), 4-bit or fp32."""
    d = args.moe_hidden_size
    config = dict(
        model_type="qwen3_moe",
        hidden_size=d,
        num_hidden_layers=args.layers,
        intermediate_size=3 * d,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=d // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.moe_intermediate_size,
        rms_norm_eps=1e-6,
        vocab_size=args.vocab,
        rope_theta=1e6,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        norm_topk_prob=True,
    )
    mx.random.seed(args.seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    if quantize:
        nn.quantize(model, group_size=args.group_size, bits=args.bits)
    mx.eval(model.parameters())
    return model


def smollm2_folder() -> str | None:
    """The converted SmolLM2-135M-Instruct folder, or None where it cannot be made."""
    try:
        from mlx_braces.models import resolve_model

        return resolve_model("smollm2-135m-instruct")
    except Exception as e:  # converter not there yet, offline, ...
        print(f"smollm2: {type(e).__name__}: {e}; using random weights of its shape")
        return None


def dequantize(model: nn.Module) -> nn.Module:
    """Exact fp32 copy of every quantized layer (H4's helper if present)."""
    try:
        from mlx_braces.quantize import dequantize_model

        return dequantize_model(model, mx.float32)
    except ImportError:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        return model


def load_base(args, spec: str) -> tuple[nn.Module, str]:
    """A fresh copy of the model ``spec`` names, in eval mode, and its label."""
    name, _, dtype = spec.partition(":")
    if dtype not in ("", "fp32"):
        raise SystemExit(f"--models {spec}: the only suffix is ':fp32'")
    fp32 = dtype == "fp32"
    if name == "random":
        shape = dict(
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab,
            tie_word_embeddings=False,
        )
        model = random_llama(args, shape, quantize=not fp32)
        label = f"random d={args.hidden_size} " + (
            "fp32" if fp32 else f"{args.bits}-bit"
        )
    elif name == "moe":
        model = random_moe(args, quantize=not fp32)
        label = (
            f"Qwen3-MoE d={args.moe_hidden_size} E={args.experts} k={args.top_k} "
            + ("fp32" if fp32 else f"{args.bits}-bit")
        )
    else:
        path = smollm2_folder() if name == "smollm2" else name
        if path is None:
            model = random_llama(args, SMOLLM2_135M, quantize=True)
            label = "SmolLM2-135M shape (random weights)"
        else:
            if path.lower().endswith(".gguf"):
                from mlx_braces.models import resolve_model

                path = resolve_model(path)
            from mlx_lm.utils import load_model

            model, _ = load_model(Path(path))
            label = "SmolLM2-135M-Instruct" if name == "smollm2" else Path(path).name
        quantized = any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
        if fp32:
            model = dequantize(model) if quantized else model
            model.set_dtype(mx.float32)
            label += " fp32 (dequantized)" if quantized else " fp32"
        else:
            label += " 4-bit" if quantized else ""
    mx.eval(model.parameters())
    model.eval()  # as mlx_lm.load leaves it
    return model, label


def make_variant(args, spec: str, variant: str) -> tuple[nn.Module, str]:
    model, label = load_base(args, spec)
    if variant == "braced":
        apply_braces(model, rank=args.rank, gate_init=args.gate_init, seed=args.seed)
    elif variant == "lora":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        config = {
            "rank": args.rank,
            "scale": 20.0,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        }
        linear_to_lora_layers(model, len(model.layers), config)
        # lora_b starts at zero; random values give the same cost and a live branch.
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())
    model.eval()
    return model, label


# ---------------------------------------------------------------------------
# Timing


def run_once(model: nn.Module, prompt: mx.array, decode_tokens: int) -> dict:
    """Prompt and decode tokens/s (wall and CPU), as ``mlx_lm.stream_generate`` does."""
    tic, cpu = time.perf_counter(), time.process_time()
    steps = generate_step(prompt, model, max_tokens=decode_tokens)
    for n, _ in enumerate(steps):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            prompt_cpu = time.process_time() - cpu
            tic, cpu = time.perf_counter(), time.process_time()
    decode_time = time.perf_counter() - tic
    decode_cpu = time.process_time() - cpu
    return {
        "prompt_tps": prompt.size / prompt_time,
        "decode_tps": n / decode_time,  # tokens after the first one
        "prompt_tps_cpu": prompt.size / prompt_cpu,
        "decode_tps_cpu": n / decode_cpu,
    }


def measure_memory(args, spec: str, variant: str) -> float:
    """Peak memory (GB) of prefill + decode in a process holding only one model."""
    model, _ = make_variant(args, spec, variant)
    prompt = mx.random.randint(0, vocab_size(model), (args.prompt_tokens,))
    run_once(model, prompt[:8], 4)  # warm-up (and the braces' caches)
    mx.clear_cache()
    mx.reset_peak_memory()
    run_once(model, prompt, args.decode_tokens)
    return mx.get_peak_memory() / 1e9


def memory_in_subprocess(argv: list[str], spec: str, variant: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-only", spec, variant],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def vocab_size(model: nn.Module) -> int:
    return model.model.embed_tokens.weight.shape[0]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


KEYS = ("decode_tps", "decode_tps_cpu", "prompt_tps", "prompt_tps_cpu")


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per variant: median tok/s; per variant but unbraced: ratio quartiles."""
    out = {}
    for v, rs in runs.items():
        out[v] = {k: statistics.median(r[k] for r in rs) for k in KEYS}
        out[v]["runs"] = rs
        if v != "unbraced" and "unbraced" in runs:
            base = runs["unbraced"]
            out[v]["ratio"] = {
                k: quartiles([r[k] / b[k] for r, b in zip(rs, base)]) for k in KEYS
            }
    return out


def ffn_timing(args, spec: str) -> dict:
    """Median µs of one-token calls of layer 0's FFN, unbraced and braced: graph
    building alone, and building + evaluating (7 interleaved rounds of N calls)."""
    ffns = {}
    for v in ("unbraced", "braced"):
        model, _ = make_variant(args, spec, v)
        ffns[v] = model.layers[0].mlp
    if spec.partition(":")[0] == "moe":  # the exact per-token path, uncached
        model, _ = make_variant(args, spec, "braced")
        ffns["braced exact"] = model.layers[0].mlp.train()
    d = model.args.hidden_size
    x = mx.random.normal((1, 1, d), key=mx.random.key(args.seed))
    mx.eval(x, *(f(x) for f in ffns.values()))
    n = args.ffn_calls
    times = {v: {"build_us": [], "call_us": []} for v in ffns}
    for _ in range(7):
        for v, f in ffns.items():
            tic = time.perf_counter()
            for _ in range(n):
                f(x)
            times[v]["build_us"].append((time.perf_counter() - tic) / n * 1e6)
            tic = time.perf_counter()
            for _ in range(n):
                mx.eval(f(x))
            times[v]["call_us"].append((time.perf_counter() - tic) / n * 1e6)
    return {
        v: {k: statistics.median(t) for k, t in ts.items()} for v, ts in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.moe:
        args.models = ["moe"]
    if args.memory_only:
        print(measure_memory(args, *args.memory_only))
        return {}

    models, labels, prompts = {}, {}, {}
    for spec in args.models:
        for v in args.variants:
            models[spec, v], labels[spec] = make_variant(args, spec, v)
        key = mx.random.key(args.seed)
        n = vocab_size(models[spec, args.variants[0]])
        prompts[spec] = mx.random.randint(0, n, (args.prompt_tokens,), key=key)
    for (spec, _), m in models.items():  # warm-up (and the braces' caches)
        run_once(m, prompts[spec][:8], 4)
    runs = {spec: {v: [] for v in args.variants} for spec in args.models}
    for i in range(args.repeats):
        for spec in args.models:
            k = i % len(args.variants)  # rotate the order: no variant always first
            for v in args.variants[k:] + args.variants[:k]:
                r = run_once(models[spec, v], prompts[spec], args.decode_tokens)
                runs[spec][v].append(r)
        print(f"repeat {i + 1}/{args.repeats} done", flush=True)
    del models
    mx.clear_cache()

    results = {}
    for spec in args.models:
        results[spec] = {"label": labels[spec]} | summarize(runs[spec])
        if not args.no_memory:
            for v in args.variants:
                mem = memory_in_subprocess(argv, spec, v)
                results[spec][v]["peak_memory_gb"] = mem

    if args.ffn_calls:
        for spec in args.models:
            t = results[spec]["ffn_timing"] = ffn_timing(args, spec)
            print(
                f"{results[spec]['label']}: layer-0 FFN, one token, median of 7x"
                f"{args.ffn_calls} calls: unbraced {t['unbraced']['call_us']:.1f} us "
                f"(graph build {t['unbraced']['build_us']:.1f}), braced "
                f"{t['braced']['call_us']:.1f} us (build {t['braced']['build_us']:.1f}),"
                f" ratio {t['braced']['call_us'] / t['unbraced']['call_us']:.3f}"
            )
            if "braced exact" in t:
                exact = t["braced exact"]["call_us"]
                print(
                    f"  braced, exact path (gathered W_V^eT per token, no cached A): "
                    f"{exact:.1f} us, ratio {exact / t['unbraced']['call_us']:.3f}"
                )

    print(
        f"\nrank {args.rank}, prompt {args.prompt_tokens}, decode {args.decode_tokens}, "
        f"{args.repeats} interleaved repeats, device {mx.default_device()}, BLAS {BLAS}"
    )
    print(
        "tok/s: median over repeats (wall | per CPU-second); ratio to unbraced: "
        "median [IQR] of per-repeat ratios"
    )
    head = (
        f"{'model':38} {'variant':9} {'decode tok/s':>15} {'decode ratio wall':>22} "
        f"{'decode ratio CPU':>22} {'prefill tok/s':>15} {'prefill ratio wall':>22}"
    )
    if not args.no_memory:
        head += f" {'peak GB':>8}"
    print(head)

    def ratio(r: dict, k: str) -> str:
        q1, q2, q3 = r["ratio"][k]
        return f"{q2:.3f} [{q1:.3f}, {q3:.3f}]"

    for spec in args.models:
        res = results[spec]
        for v in args.variants:
            r = res[v]
            has = "ratio" in r
            line = (
                f"{res['label'][:38]:38} {v:9} "
                f"{r['decode_tps']:7.1f}|{r['decode_tps_cpu']:7.1f} "
                f"{ratio(r, 'decode_tps') if has else '':>22} "
                f"{ratio(r, 'decode_tps_cpu') if has else '':>22} "
                f"{r['prompt_tps']:7.1f}|{r['prompt_tps_cpu']:7.1f} "
                f"{ratio(r, 'prompt_tps') if has else '':>22}"
            )
            if not args.no_memory:
                line += f" {r['peak_memory_gb']:8.3f}"
            print(line)

    report = {
        "config": vars(args) | {"device": str(mx.default_device()), "blas": BLAS},
        "results": results,
        "goal": {"braced decode ratio": ">= 0.97", "braced vs lora": ">= 1"},
        "command": " ".join(["python", "scripts/bench_forward.py", *argv]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"Wrote {out}")
    return report


if __name__ == "__main__":
    main()
