"""Write the quickstart's data, ``mlx_braces/assets/quickstart``, from the embedded SST-2.

    python scripts/make_quickstart_data.py [--train 400] [--valid 100] [--max-tokens 64]

Each line is a completions example: the question ``QUICKSTART_QUESTION`` and an SST-2
review as the prompt, its one-word label (``positive``/``negative``) as the completion.
The training rows are the first ones of ``mlx_braces/assets/sst2`` (already shuffled,
balanced) that are at most ``--max-tokens`` long in SmolLM2's chat template (mlx-lm pads
a batch to a multiple of 32 tokens, so a 65-token row makes a 96-wide batch: 1.5x the
step); validation rows are the first ones; the test split is the whole SST-2 dev set.
Needs the quickstart model in the cache (``python -m mlx_braces.models fetch
smollm2-135m-instruct``) for its tokenizer.
"""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import mlx_braces  # noqa: F401  (first: it loads OpenBLAS before MLX binds a BLAS)

# isort: split
from mlx_lm.tuner.datasets import create_dataset
from mlx_lm.utils import load_tokenizer

from mlx_braces.models import (
    EMBEDDED_DATA,
    QUICKSTART_DATA,
    QUICKSTART_MODEL,
    QUICKSTART_QUESTION,
    resolve_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    tokenizer = load_tokenizer(Path(resolve_model(QUICKSTART_MODEL)))
    as_completions = SimpleNamespace(mask_prompt=True)
    out = QUICKSTART_DATA
    out.mkdir(exist_ok=True)
    for split, n in (("train", args.train), ("valid", args.valid), ("test", None)):
        rows = []
        for line in (EMBEDDED_DATA / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            prompt = f"{QUICKSTART_QUESTION}\n\n{row['text']}"
            rows.append({"prompt": prompt, "completion": row["attribute"]})
        if split == "train":
            dataset = create_dataset(rows, tokenizer, as_completions)
            rows = [r for r in rows if len(dataset.process(r)[0]) <= args.max_tokens]
        rows = rows[:n]
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{out / split}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
