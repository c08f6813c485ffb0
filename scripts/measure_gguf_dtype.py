"""Measure which float dtype a converted GGUF needs: residual range and logit drift.

Converts one GGUF with each ``--dtypes`` entry (dequantized tensors in that dtype),
runs one forward over the same prompt ids with ``mlx_lm.utils.load_model``, and
prints, against the float32 conversion, the largest logit difference and argmax
agreement, plus the largest |residual| after every layer of the float32 model.
The numbers behind docs/METHOD.md's "GGUF dtypes" note came from::

    python scripts/measure_gguf_dtype.py gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

# isort: skip_file
import argparse
import tempfile
import time
from pathlib import Path

import mlx_braces  # noqa: F401  (loads the OpenBLAS before mlx.core)

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.utils import load_model

from mlx_braces.conversion.gguf import convert_gguf

IDS = [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799]  # Gemma: a short text


def residual_maxima(model, ids: list[int]) -> list[float]:
    """Largest |h| after each block of a gemma3_text / llama-style model."""
    m = model.model
    h = m.embed_tokens(mx.array([ids]))
    if model.model_type == "gemma3_text":
        h = h * mx.array(m.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    mask = create_attention_mask(h, None)
    out = []
    for layer in m.layers:
        h = layer(h, mask, None)
        out.append(float(mx.abs(h.astype(mx.float32)).max()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "float16", "bfloat16"]
    )
    args = parser.parse_args()
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            folder = convert_gguf(
                args.gguf, Path(tmp) / dtype, dtype=dtype, progress=False
            )
            model, _ = load_model(folder)
            start = time.perf_counter()
            out = model(mx.array([IDS]))[0].astype(mx.float32)
            mx.eval(out)
            logits[dtype] = np.array(out)
            print(f"{dtype}: forward {time.perf_counter() - start:.1f} s")
            if dtype == "float32":
                print(
                    "max |residual| per layer:",
                    [round(v) for v in residual_maxima(model, IDS)],
                )
            del model
    ref = logits.get("float32")
    if ref is None:
        return
    print(f"float32 max |logit| {np.abs(ref).max():.2f}")
    for dtype, x in logits.items():
        if dtype != "float32":
            print(
                f"{dtype}: finite {np.isfinite(x).all()}, max |logit diff| "
                f"{np.nanmax(np.abs(x - ref)):.3f}, argmax agreement "
                f"{(x.argmax(-1) == ref.argmax(-1)).mean():.2f}"
            )


if __name__ == "__main__":
    main()
