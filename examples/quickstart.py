"""The quickstart through the Python API: brace the embedded stories260K, train, compare.

    python examples/quickstart.py [--iters 200] [--adapter-path runs/quickstart]

Runs offline in about a minute on 2 CPU cores. stories260K is a 260K-parameter toy
trained on TinyStories; here its braces learn the embedded SST-2 movie-review sentences.
"""

import argparse
from types import SimpleNamespace

import mlx_braces  # first: it loads OpenBLAS before MLX binds a BLAS

# isort: split
import mlx.optimizers as optim
from mlx_lm import load as mlx_load
from mlx_lm.tuner.datasets import load_local_dataset

from mlx_braces.adapters import quantize_base
from mlx_braces.train import EMBEDDED_DATA, EMBEDDED_MODEL
from mlx_braces.trainer import TrainingArgs, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--adapter-path", default="runs/quickstart")
    parser.add_argument("--prompt", default="the movie")
    args = parser.parse_args()

    # 1. The base model, quantized to 4 bits in memory where mlx-lm's rules allow.
    model, tokenizer, config = mlx_load(str(EMBEDDED_MODEL), return_config=True)
    model, _ = quantize_base(model, config, bits=4, group_size=64)

    # 2. Brace every FFN: only R (rank x d) and the gate of each layer train.
    mlx_braces.apply_braces(model, rank=16, num_layers=-1, gate_init=-5.0, seed=0)
    mlx_braces.print_trainable_parameters(model)

    # 3. Train on the embedded SST-2 text with the project's loop (mlx-lm's, plus the
    #    orthonormal retraction of R after each step, checkpoints and metrics).
    train_set, valid_set, _ = load_local_dataset(
        EMBEDDED_DATA, tokenizer, SimpleNamespace(mask_prompt=False)
    )
    train(
        model,
        optim.Adam(learning_rate=1e-2),
        train_set,
        valid_set,
        TrainingArgs(
            batch_size=4,
            iters=args.iters,
            steps_per_eval=args.iters,
            adapter_file=f"{args.adapter_path}/adapters.safetensors",
            adapter_config={
                "model": str(EMBEDDED_MODEL),
                "base_quantization": {"bits": 4, "group_size": 64},
            },
        ),
    )

    # 4. Load base + adapter as a user would, and compare greedy continuations.
    braced, tokenizer = mlx_braces.load(adapter_path=args.adapter_path)
    base, _ = mlx_load(str(EMBEDDED_MODEL))
    base, _ = quantize_base(base, config, bits=4, group_size=64)
    print(f"prompt: {args.prompt!r}")
    for name, m in (("base", base), ("braced", braced)):
        text = mlx_braces.generate(m, tokenizer, args.prompt, max_tokens=40)
        print(f"{name:>6}: {text!r}")


if __name__ == "__main__":
    main()
