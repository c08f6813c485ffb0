"""One gate per MoE layer or one per expert? A short distillation comparison.

The student is a random 4-bit Qwen3-MoE-shaped model, braced (rank ``--rank``, every
layer). The teacher is the same model in full precision with every expert's weights
perturbed by its own relative noise (``--noise`` · a per-expert log-normal scale, so
experts drift unequally, as a fine-tune moves them). Both variants train the same
steps on the teacher's next-token distributions over random token sequences (Adam,
``R`` retracted after each step) and are scored by the KL divergence to the teacher
on held-out sequences:

- ``shared gate``: one ``R`` and one gate per layer (``rank·d + 1`` parameters);
- ``per-expert gates``: one ``R`` and a gate per expert (``rank·d + E``).

    python scripts/measure_moe_gates.py [--seeds 3 --steps 200] \\
        [--out runs/measure_moe_gates.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout

import mlx_braces  # noqa: E402, F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3_moe  # noqa: E402

from mlx_braces.braces import (  # noqa: E402
    apply_braces,
    braced_layers,
    orthonormality_error,
    orthonormalize,
    trainable_parameter_count,
)

VARIANTS = ("shared gate", "per-expert gates")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--moe-intermediate-size", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gate-init", type=float, default=-3.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--noise", type=float, default=1.0, help="teacher's expert drift")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/measure_moe_gates.json")
    return p


def base_model(args, seed: int) -> nn.Module:
    """A random full-precision Qwen3-MoE of the requested shape (mlx-lm's init)."""
    config = dict(
        model_type="qwen3_moe",
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden_size // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.moe_intermediate_size,
        rms_norm_eps=1e-6,
        vocab_size=args.vocab,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        norm_topk_prob=True,
    )
    mx.random.seed(seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def teacher_of(args, seed: int) -> nn.Module:
    """The base with each expert's weights moved by its own relative noise."""
    model = base_model(args, seed)
    key = mx.random.key(seed + 1000)
    weights = []
    for k, v in tree_flatten(model.parameters()):
        if ".switch_mlp." in k:  # (E, out, in): one drift size per expert
            k1, k2, key = mx.random.split(key, 3)
            size = args.noise * mx.exp(
                0.7 * mx.random.normal((v.shape[0], 1, 1), key=k1)
            )
            rms = mx.sqrt(mx.mean(v * v, axis=(1, 2), keepdims=True))
            v = v + size * rms * mx.random.normal(v.shape, key=k2)
        weights.append((k, v))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


def student_of(args, seed: int, variant: str) -> nn.Module:
    model = base_model(args, seed)
    nn.quantize(model, group_size=32, bits=4)
    apply_braces(model, rank=args.rank, gate_init=args.gate_init, seed=seed)
    if variant == "per-expert gates":
        for _, m in braced_layers(model):
            m.gate = mx.full((m.num_experts,), args.gate_init, dtype=mx.float32)
    model.train()
    mx.eval(model.parameters())
    return model


def kl(student: nn.Module, teacher_logprobs: mx.array, tokens: mx.array) -> mx.array:
    """Mean KL(teacher || student) over every next-token position."""
    logp = nn.log_softmax(student(tokens).astype(mx.float32), axis=-1)
    return (mx.exp(teacher_logprobs) * (teacher_logprobs - logp)).sum(-1).mean()


def run(args, seed: int, variant: str) -> dict:
    teacher = teacher_of(args, seed)
    teacher.eval()
    student = student_of(args, seed, variant)
    shape = (args.batch_size, args.seq_length)
    held_out = mx.random.randint(
        0, args.vocab, (32, args.seq_length), key=mx.random.key(seed + 7)
    )
    held_teacher = nn.log_softmax(teacher(held_out).astype(mx.float32), axis=-1)

    def held_kl() -> float:
        student.eval()
        value = kl(student, held_teacher, held_out).item()
        student.train()
        return value

    start = held_kl()
    loss_and_grad = nn.value_and_grad(student, kl)
    optimizer = optim.Adam(learning_rate=args.lr)
    key = mx.random.key(seed + 99)
    tic = time.perf_counter()
    for _ in range(args.steps):
        key, sub = mx.random.split(key)
        tokens = mx.random.randint(0, args.vocab, shape, key=sub)
        target = mx.stop_gradient(nn.log_softmax(teacher(tokens), axis=-1))
        loss, grads = loss_and_grad(student, target, tokens)
        optimizer.update(student, grads)
        orthonormalize(student)
        mx.eval(student.parameters(), optimizer.state, loss)
    gates = [mx.sigmoid(m.gate) for _, m in braced_layers(student)]
    return {
        "seed": seed,
        "variant": variant,
        "parameters": trainable_parameter_count(student),
        "held_out_kl_start": start,
        "held_out_kl": held_kl(),
        "final_train_kl": loss.item(),
        "gate_range": [
            min(g.min().item() for g in gates),
            max(g.max().item() for g in gates),
        ],
        "orthonormality_error": orthonormality_error(student),
        "seconds": time.perf_counter() - tic,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    rows = []
    for seed in range(args.seeds):
        for variant in VARIANTS:
            rows.append(run(args, seed, variant))
            print(f"  {rows[-1]}", flush=True)
    print(
        f"\nrandom 4-bit Qwen3-MoE d={args.hidden_size} experts={args.experts} "
        f"(top {args.top_k}, width {args.moe_intermediate_size}) x {args.layers} "
        f"layers; rank {args.rank}, gate_init {args.gate_init}, Adam lr {args.lr}, "
        f"{args.steps} steps of {args.batch_size}x{args.seq_length} tokens, "
        f"{args.seeds} seeds"
    )
    print(f"{'variant':18}{'params':>8}{'KL start':>10}{'KL after':>16}{'gates':>16}")
    summary = {}
    for variant in VARIANTS:
        rs = [r for r in rows if r["variant"] == variant]
        after = [r["held_out_kl"] for r in rs]
        sd = statistics.stdev(after) if len(after) > 1 else 0.0
        summary[variant] = {
            "parameters": rs[0]["parameters"],
            "held_out_kl_start": statistics.mean(r["held_out_kl_start"] for r in rs),
            "held_out_kl_mean": statistics.mean(after),
            "held_out_kl_sd": sd,
        }
        s = summary[variant]
        lo = min(r["gate_range"][0] for r in rs)
        hi = max(r["gate_range"][1] for r in rs)
        print(
            f"{variant:18}{s['parameters']:>8,}{s['held_out_kl_start']:>10.4f}"
            f"{s['held_out_kl_mean']:>9.4f} ± {sd:.4f}{f'{lo:.2f}..{hi:.2f}':>16}"
        )
    report = {
        "command": " ".join(["python", "scripts/measure_moe_gates.py", *argv]),
        "settings": vars(args),
        "summary": summary,
        "runs": rows,
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
