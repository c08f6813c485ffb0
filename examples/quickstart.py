"""The quickstart through the Python API: SmolLM2 learns a one-word answer, then compare.

    python examples/quickstart.py [--iters 25] [--adapter-path runs/quickstart]

The same job as ``python -m mlx_braces.train && python -m mlx_braces.generate``:
SmolLM2-135M-Instruct (fetched into the cache on first use) is braced and trained to
answer "Is this movie review positive or negative?" with one word, on the shipped
quickstart data (SST-2 reviews); then the base model and the braced one answer a
held-out review.
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

import mlx_braces  # first: on Linux it loads OpenBLAS before MLX binds a BLAS

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.datasets import load_local_dataset

MODEL = "smollm2-135m-instruct"
DATA = Path(mlx_braces.__file__).parent / "assets" / "quickstart"  # shipped
QUESTION = "Is this movie review positive or negative?"  # the data's prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--adapter-path", default="runs/quickstart")
    parser.add_argument("--review", default="unflinchingly bleak and desperate")
    args = parser.parse_args()

    # 1. The base model; on a CPU its 4-bit layers are made float32 (much faster).
    dtype = "float32" if mx.default_device().type == mx.DeviceType.cpu else False
    model, tokenizer = mlx_braces.load(MODEL, dequantize=dtype)

    # 2. Brace every FFN: only R (rank x d) and the gate of each layer train.
    mlx_braces.apply_braces(model, rank=16, gate_init=-3.0, seed=0)
    mlx_braces.print_trainable_parameters(model)

    # 3. Train on the answers only (mask_prompt) with the project's loop: mlx-lm's,
    #    plus the retraction of R after each step, checkpoints and metrics.
    train_set, valid_set, _ = load_local_dataset(
        DATA, tokenizer, SimpleNamespace(mask_prompt=True)
    )
    mlx_braces.train(
        model,
        optim.Adam(learning_rate=2e-3),
        train_set,
        valid_set,
        mlx_braces.TrainingArgs(
            batch_size=4,
            iters=args.iters,
            val_batches=2,
            steps_per_report=5,
            steps_per_eval=args.iters,
            adapter_file=f"{args.adapter_path}/adapters.safetensors",
            adapter_config={"model": MODEL},
        ),
    )

    # 4. Load base + adapter as a user would, and compare their greedy answers.
    braced, tokenizer = mlx_braces.load(
        adapter_path=args.adapter_path, dequantize=dtype
    )
    base, _ = mlx_braces.load(MODEL, dequantize=dtype)
    messages = [{"role": "user", "content": f"{QUESTION}\n\n{args.review}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(f"review: {args.review!r}")
    for name, m in (("base", base), ("braced", braced)):
        text = mlx_braces.generate(m, tokenizer, prompt, max_tokens=32)
        print(f"{name:>6}: {text!r}")


if __name__ == "__main__":
    main()
