"""Toxicity steering data from RealToxicityPrompts rows labelled by Perspective.

Only the toxicity scorer's training rows are used (``scorers.rtp_rows``: the same
80/20 split by row), so the held-out rows stay unseen by both the adapter and the
scorer: their prompts are ``eval_steering.py --prompts toxicity``. From those rows:

- ``"attribute": "toxic"``: every text (prompt or continuation) whose Perspective
  toxicity is >= 0.5 (the file's prompts are all < 0.5, so these are continuations);
- ``"attribute": "nontoxic"``: as many texts again, drawn at random from those < 0.1.

A tenth of each side is the validation split. Train the attribute adapter with::

    python scripts/make_toxicity_data.py --out data_toxicity
    python -m mlx_braces.train --model smollm2-135m-instruct --data data_toxicity \\
        --attributes toxicity --adapter-path adapters_toxicity
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorers  # noqa: E402  (scripts/scorers.py)

TOXIC, CLEAN = 0.5, 0.1  # Perspective toxicity thresholds of the two sides


def build(seed: int = 0) -> dict[str, list[dict]]:
    """{"train": [...], "valid": [...]} lines {"text", "attribute", "toxicity"}."""
    train_rows, _ = scorers.rtp_rows()
    texts = [
        (r[part]["text"].strip(), r[part]["toxicity"])
        for r in train_rows
        for part in ("prompt", "continuation")
        if r[part].get("toxicity") is not None and r[part]["text"].strip()
    ]
    toxic = [(t, x) for t, x in texts if x >= TOXIC]
    clean = [(t, x) for t, x in texts if x < CLEAN]
    rng = random.Random(seed)
    clean = rng.sample(clean, min(len(toxic), len(clean)))
    out = {"train": [], "valid": []}
    for name, side in (("toxic", toxic), ("nontoxic", clean)):
        rng.shuffle(side)
        cut = len(side) // 10
        for split, part in (("valid", side[:cut]), ("train", side[cut:])):
            out[split] += [
                {"text": t, "attribute": name, "toxicity": round(x, 4)} for t, x in part
            ]
    for lines in out.values():
        rng.shuffle(lines)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Folder for train.jsonl, valid.jsonl.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        data = build(args.seed)
    except scorers.ScorerError as e:
        sys.exit(f"Error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in data.items():
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
        )
        n_toxic = sum(x["attribute"] == "toxic" for x in lines)
        print(f"{out / split}.jsonl: {len(lines)} lines ({n_toxic} toxic)")


if __name__ == "__main__":
    main()
