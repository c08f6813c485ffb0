"""Fine-tune braces on a real model from the Hugging Face Hub, then use the adapter.

    python examples/finetune_hub.py --model mlx-community/Llama-3.2-1B-Instruct-4bit \
        --data DIR --iters 1000

DIR holds mlx-lm data (train.jsonl, valid.jsonl; text, completions or chat lines).
Downloads the model on first use, so it is not run in CI. The same job from the shell
is `python -m mlx_braces.train --model ... --data DIR --mask-prompt --grad-checkpoint`.
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

import mlx_braces  # first: it loads OpenBLAS before MLX binds a BLAS

# isort: split
import mlx.optimizers as optim
from mlx_lm.tuner.datasets import load_local_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlx-community/Llama-3.2-1B-Instruct-4bit")
    parser.add_argument("--data", required=True)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--adapter-path", default="adapters")
    parser.add_argument("--prompt", default="Write a one-sentence movie review.")
    args = parser.parse_args()

    # mlx-lm's loader (plus named models and GGUF files), then braces on every FFN.
    model, tokenizer = mlx_braces.load(args.model)
    mlx_braces.apply_braces(model, rank=args.rank, seed=0)
    mlx_braces.print_trainable_parameters(model)

    # mlx-lm's datasets; the loss scores the completions only (mask_prompt).
    train_set, valid_set, _ = load_local_dataset(
        Path(args.data), tokenizer, SimpleNamespace(mask_prompt=True)
    )
    mlx_braces.train(
        model,
        optim.Adam(learning_rate=args.learning_rate),
        train_set,
        valid_set,
        mlx_braces.TrainingArgs(
            iters=args.iters,
            grad_checkpoint=True,
            adapter_file=str(Path(args.adapter_path) / "adapters.safetensors"),
            adapter_config={"model": args.model},  # the base the adapter loads on
        ),
    )

    # The adapter loads on top of the unchanged checkpoint it records.
    model, tokenizer = mlx_braces.load(adapter_path=args.adapter_path)
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(mlx_braces.generate(model, tokenizer, prompt, max_tokens=100, verbose=True))


if __name__ == "__main__":
    main()
