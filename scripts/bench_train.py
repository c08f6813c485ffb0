"""Benchmark braces fine-tuning against mlx-lm's own LoRA, in one run.

Table 1 (speed): a random 4-bit model of Llama proportions, random-token batches;
braces (rank 16, every layer, our loop) versus LoRA (rank 8 and 16; mlx-lm's default
keys = every linear layer, and q,v only; mlx-lm's ``train`` loop), same batch size,
sequence length and steps. Trainable parameters, tokens/s (after a warm-up window),
peak memory; ratios are to LoRA of the same rank.

Table 2 (quality): the embedded stories260K model (4-bit, as ``--model stories260k``
trains it) on the embedded SST-2 subset for the same iterations; validation loss on
the whole validation split.

With ``--moe`` the speed table's model is a random 4-bit Qwen3-MoE instead (every
block routed experts: ``--experts`` of width ``--moe-ffn-dims``, top ``--top-k``;
mlx-lm's LoRA default keys then include the experts' SwitchLinear layers), and an
``unbraced`` row times the same loop's forward and backward with nothing trained
(the gradient taken with respect to the token embeddings' output), the floor that
braces' ratio is read against.

    python scripts/bench_train.py --out runs/bench_train.json
    python scripts/bench_train.py --moe --skip-quality --out runs/bench_train_moe.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.models import llama, qwen3_moe
from mlx_lm.tuner.trainer import TrainingArgs as LoRATrainingArgs
from mlx_lm.tuner.trainer import train as lora_train
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import quantize_model

from mlx_braces import apply_braces
from mlx_braces.braces import orthonormality_error, trainable_parameter_count
from mlx_braces.train import EMBEDDED_DEFAULTS, load_datasets, load_model, resolve_args
from mlx_braces.trainer import TrainingArgs, evaluate, iterate_batches, train

QV = ["self_attn.q_proj", "self_attn.v_proj"]
CONFIGS = [  # (name, method, rank, LoRA keys)
    ("braces r16", "braces", 16, None),
    ("LoRA r8 default keys", "lora", 8, None),
    ("LoRA r16 default keys", "lora", 16, None),
    ("LoRA r8 q,v", "lora", 8, QV),
    ("LoRA r16 q,v", "lora", 16, QV),
]


def synthetic_model(args) -> nn.Module:
    """A random Llama (GQA 4:1, SwiGLU d_ff ≈ 2.75·d), quantized as mlx-lm does;
    with ``--moe`` a random Qwen3-MoE of the same width and depth."""
    if args.moe:
        return synthetic_moe(args)
    config = dict(
        model_type="llama",
        hidden_size=args.dims,
        intermediate_size=args.ffn_dims,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 4,
        vocab_size=args.vocab,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = quantize_model(model, config, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def synthetic_moe(args) -> nn.Module:
    """A random 4-bit Qwen3-MoE (every block routed experts), quantized as mlx-lm does."""
    config = dict(
        model_type="qwen3_moe",
        hidden_size=args.dims,
        intermediate_size=args.ffn_dims,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 4,
        head_dim=args.dims // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.moe_ffn_dims,
        rms_norm_eps=1e-6,
        vocab_size=args.vocab,
        rope_theta=1e6,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        norm_topk_prob=True,
    )
    mx.random.seed(0)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = quantize_model(model, config, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def unbraced_step_speed(args, data) -> dict:
    """Tokens/s of the loop's forward and backward on the frozen base model alone.

    Nothing is trainable, so the gradient is taken with respect to the embedding
    output (a (B, L, d) array), which backpropagates through every block as braces'
    gradient does, without an optimizer step.
    """
    model = synthetic_model(args)
    model.freeze()
    inner = model.model
    tokens = mx.array([row for row, _ in data[: args.batch_size]])
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(h):
        from mlx_lm.models.base import create_attention_mask

        mask = create_attention_mask(h, None)
        for layer in inner.layers:
            h = layer(h, mask, None)
        logits = model.lm_head(inner.norm(h))
        return nn.losses.cross_entropy(logits, targets).mean()

    grad = mx.grad(loss)
    h0 = inner.embed_tokens(inputs)
    mx.eval(grad(h0))  # warm-up
    times = []
    for _ in range(args.steps):
        tic, cpu = time.perf_counter(), time.process_time()
        mx.eval(grad(h0))
        times.append((time.perf_counter() - tic, time.process_time() - cpu))
    n = inputs.size * len(times)
    return {
        "config": "unbraced (fwd+bwd)",
        "trainable_parameters": 0,
        "tokens_per_second": n / sum(t for t, _ in times),
        "tokens_per_cpu_second": n / sum(c for _, c in times),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def adapt(model: nn.Module, method: str, rank: int, keys, layers: int) -> nn.Module:
    """Braces on every FFN, or mlx-lm's LoRA on ``keys`` of every layer."""
    if method == "braces":
        return apply_braces(model, rank=rank, seed=0)
    model.freeze()
    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, layers, lora)
    return model


class Reports:
    """Training reports, each with the wall and process CPU time it arrived at."""

    def __init__(self):
        self.train = []

    def on_train_loss_report(self, info):
        clocks = {"wall": time.perf_counter(), "cpu": time.process_time()}
        self.train.append({**info, **clocks})

    def on_val_loss_report(self, info):
        pass


def fit(
    model, method: str, lr: float, data, iters: int, batch: int, seq: int, report: int
):
    """Train with our loop (braces) or mlx-lm's (LoRA); returns the reports."""
    reports = Reports()
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        common = dict(
            batch_size=batch,
            iters=iters,
            steps_per_report=report,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=seq,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )
        optimizer = optim.Adam(learning_rate=lr)
        if method == "braces":
            train(
                model,
                optimizer,
                data,
                None,
                TrainingArgs(**common),
                training_callback=reports,
            )
        else:
            lora_train(
                model,
                optimizer,
                data,
                None,
                LoRATrainingArgs(**common),
                training_callback=reports,
            )
    return reports.train


def speed_table(args) -> list[dict]:
    """Every config ``--repeats`` times, round robin; the best speed of each."""
    # Random token sequences of exactly --seq-length tokens (no padding).
    mx.random.seed(1)
    tokens = mx.random.randint(0, args.vocab, (args.batch_size * 4, args.seq_length))
    data = [(row, 0) for row in tokens.tolist()]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, method, rank, keys in CONFIGS:
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            model = adapt(synthetic_model(args), method, rank, keys, args.layers)
            reports = fit(
                model,
                method,
                1e-4,
                data,
                iters=2 * args.steps,
                batch=args.batch_size,
                seq=args.seq_length + 1,
                report=args.steps,
            )
            # The window after the warm-up (compilation) window. On a shared
            # machine wall time depends on the neighbours; this process's CPU
            # time much less.
            first, last = reports[-2], reports[-1]
            tokens = last["trained_tokens"] - first["trained_tokens"]
            row = {
                "config": name,
                "trainable_parameters": trainable_parameter_count(model),
                "tokens_per_second": last["tokens_per_second"],
                "tokens_per_cpu_second": tokens / (last["cpu"] - first["cpu"]),
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
            }
            print(f"  {name}: {row}", flush=True)
            if name in best:
                for k in ("tokens_per_second", "tokens_per_cpu_second"):
                    row[k] = max(row[k], best[name][k])
            best[name] = row
            del model
        if args.moe:
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            row = unbraced_step_speed(args, data)
            print(f"  {row['config']}: {row}", flush=True)
            old = best.get(row["config"])
            if old is not None:
                for k in ("tokens_per_second", "tokens_per_cpu_second"):
                    row[k] = max(row[k], old[k])
            best[row["config"]] = row
    names = [name for name, *_ in CONFIGS]
    return [best[n] for n in names + (["unbraced (fwd+bwd)"] if args.moe else [])]


def quality_table(args) -> list[dict]:
    options = resolve_args(
        {"model": "stories260k", "max_seq_length": args.quality_seq_length}
    )
    with contextlib.redirect_stdout(io.StringIO()):
        _, tokenizer = load_model(options)
        train_set, valid_set, _ = load_datasets(options, tokenizer)

    def val_loss(model):
        return evaluate(model, valid_set, 4, -1, options.max_seq_length,
                        iterate_batches=iterate_batches)  # fmt: skip

    rows = []
    with contextlib.redirect_stdout(io.StringIO()):
        base, _ = load_model(options)
    rows.append({"config": "base model (no training)", "val_loss": val_loss(base)})
    for name, method, rank, keys in CONFIGS:
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = load_model(options)
        mx.random.seed(0)  # LoRA's A is drawn from MLX's global generator
        adapt(model, method, rank, keys, len(model.layers))
        lr = args.braces_lr if method == "braces" else args.lora_lr
        tic = time.perf_counter()
        reports = fit(
            model,
            method,
            lr,
            train_set,
            iters=args.quality_iters,
            batch=4,
            seq=options.max_seq_length,
            report=args.quality_iters,
        )
        row = {
            "config": name,
            "learning_rate": lr,
            "trainable_parameters": trainable_parameter_count(model),
            "final_train_loss": reports[-1]["train_loss"],
            "val_loss": val_loss(model),
            "seconds": time.perf_counter() - tic,
        }
        if method == "braces":
            row["orthonormality_error"] = orthonormality_error(model)
        rows.append(row)
        print(f"  {name}: {row}", flush=True)
    return rows


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_speed(rows: list[dict]) -> None:
    by = {r["config"]: r for r in rows}
    keys = ("trainable_parameters", "tokens_per_second", "tokens_per_cpu_second")
    keys += ("peak_memory_gb",)
    print(
        f"\n{'config':<23}{'params':>8}{'tok/s':>7}{'tok/cpu-s':>10}{'peak GB':>8}"
        f"{'params/LoRA':>15}{'tok/s/LoRA':>15}{'tok/cpu-s/LoRA':>16}{'mem/LoRA':>15}"
    )
    for r in rows:
        rank = r["config"].split()[1]
        refs = [by.get(f"LoRA {rank} q,v"), by.get(f"LoRA {rank} default keys")]
        if r["config"].startswith("unbraced"):
            refs = []
        cells = [" / ".join(ratio(r[k], ref[k]) for ref in refs if ref) for k in keys]
        print(
            f"{r['config']:<23}{r['trainable_parameters']:>8,}"
            f"{r['tokens_per_second']:>7.0f}{r['tokens_per_cpu_second']:>10.0f}"
            f"{r['peak_memory_gb']:>8.3f}{cells[0]:>15}{cells[1]:>15}{cells[2]:>16}"
            f"{cells[3]:>15}"
        )
    print("(ratios: to LoRA of the same rank on q,v / on mlx-lm's default keys)")
    base = by.get("unbraced (fwd+bwd)")
    if base is not None:
        for r in rows:
            if r is not base:
                print(
                    f"{r['config']:<23} / unbraced fwd+bwd: tok/s "
                    f"{ratio(r['tokens_per_second'], base['tokens_per_second'])}, "
                    f"tok/cpu-s "
                    f"{ratio(r['tokens_per_cpu_second'], base['tokens_per_cpu_second'])}"
                )


def print_quality(rows: list[dict]) -> None:
    print(f"\n{'config':<26}{'lr':>9}{'params':>9}{'train loss':>12}{'val loss':>10}")
    for r in rows:
        lr = f"{r['learning_rate']:.0e}" if "learning_rate" in r else "-"
        params = (
            f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "-"
        )
        train_loss = f"{r['final_train_loss']:.3f}" if "final_train_loss" in r else "-"
        print(
            f"{r['config']:<26}{lr:>9}{params:>9}{train_loss:>12}{r['val_loss']:>10.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_train.json")
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--ffn-dims", type=int, default=704)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps, after as many warm-up steps"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each config (best speed kept)"
    )
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE model")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--moe-ffn-dims", type=int, default=128)
    parser.add_argument("--quality-iters", type=int, default=100)
    parser.add_argument("--quality-seq-length", type=int, default=64)
    # The best of 1e-4..3e-2 (braces) and 1e-5..1e-2 (LoRA r16 q,v) after 200
    # iterations on this model and data.
    parser.add_argument(
        "--braces-lr", type=float, default=EMBEDDED_DEFAULTS["learning_rate"]
    )
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    tic = time.perf_counter()
    shape = (
        f"Qwen3-MoE d={args.dims} experts={args.experts} (width {args.moe_ffn_dims}, "
        f"top {args.top_k})"
        if args.moe
        else f"Llama d={args.dims} d_ff={args.ffn_dims}"
    )
    print(
        f"Speed: random 4-bit {shape} "
        f"layers={args.layers} heads={args.heads}/{args.heads // 4} "
        f"vocab={args.vocab}; batch {args.batch_size} x {args.seq_length} tokens, "
        f"{args.steps} warm-up + {args.steps} timed steps, best of {args.repeats}",
        flush=True,
    )
    speed = speed_table(args)
    print_speed(speed)
    quality = []
    if not args.skip_quality:
        print(
            f"\nQuality: stories260K (4-bit) on SST-2, {args.quality_iters} iterations "
            f"of batch 4 (max {args.quality_seq_length} tokens); braces lr "
            f"{args.braces_lr:g}, LoRA lr {args.lora_lr:g}",
            flush=True,
        )
        quality = quality_table(args)
        print_quality(quality)

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": vars(args),
        "machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, "
        f"{mx.default_device()}",
        "seconds": time.perf_counter() - tic,
        "speed": speed,
        "quality": quality,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nWrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
