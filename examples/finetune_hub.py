"""Fine-tune braces on a real model from the Hugging Face Hub, then use the adapter.

    python examples/finetune_hub.py --model mlx-community/Llama-3.2-1B-Instruct-4bit \
        --data DIR --iters 1000

DIR holds mlx-lm data (train.jsonl, valid.jsonl, optional test.jsonl; text, completions
or chat lines). Downloads the model on first use, so it is not run in CI. The same job
from the shell is `python -m mlx_braces.train --model ... --data DIR`.
"""

import argparse

from mlx_braces import generate, load
from mlx_braces.train import main as train_main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlx-community/Llama-3.2-1B-Instruct-4bit")
    parser.add_argument("--data", required=True)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapter-path", default="adapters")
    parser.add_argument("--prompt", default="Write a one-sentence movie review.")
    args = parser.parse_args()

    # Train with the CLI's own code path (flags as in `mlx_lm.lora`), testing at the end.
    train_main(
        [
            "--model", args.model,
            "--data", args.data,
            "--iters", str(args.iters),
            "--rank", str(args.rank),
            "--adapter-path", args.adapter_path,
            "--mask-prompt",
            "--grad-checkpoint",
            "--test",
        ]
    )  # fmt: skip

    # The adapter loads on top of the unchanged checkpoint it records.
    model, tokenizer = load(adapter_path=args.adapter_path)
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(generate(model, tokenizer, prompt, max_tokens=100, verbose=True))


if __name__ == "__main__":
    main()
