"""Convert models into mlx-lm folders: GGUF files, or llama.cpp's llama2.c checkpoints.

Usage::

    python -m mlx_braces.convert --gguf FILE.gguf --mlx-path DIR \\
        [--dtype float16|bfloat16|float32] [--q-bits N --q-group-size N]
    python -m mlx_braces.convert --llama2c MODEL.bin --tokenizer TOK.bin \\
        --mlx-path DIR [--dtype ...]

Bad input ends with one ``Error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="mlx_braces.convert",
        description="Convert a GGUF file or a llama2.c checkpoint to an mlx-lm folder.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="GGUF file (llama, qwen2, gemma3)")
    source.add_argument("--llama2c", type=Path, help="llama2.c model .bin")
    parser.add_argument("--tokenizer", type=Path, help="llama2.c tokenizer .bin")
    parser.add_argument("--mlx-path", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="float dtype (GGUF default: keep F32/F16/BF16, dequantize to float16, "
        "float32 for gemma3; llama2c default: float32)",
    )
    parser.add_argument(
        "--q-bits", type=int, help="GGUF: re-quantize the non Q4_0/Q4_1/Q8_0 matrices"
    )
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        if args.gguf is not None:
            if args.tokenizer is not None:
                parser.error("--tokenizer belongs to --llama2c")
            from .conversion.gguf import convert_gguf

            out = convert_gguf(
                args.gguf,
                args.mlx_path,
                dtype=args.dtype,
                q_bits=args.q_bits,
                q_group_size=args.q_group_size,
                progress=not args.no_progress,
            )
        else:
            if args.tokenizer is None:
                parser.error("--llama2c needs --tokenizer")
            if args.q_bits is not None:
                parser.error("--q-bits is for --gguf")
            from .conversion.llama2c import write_model_folder

            out = write_model_folder(
                args.llama2c, args.tokenizer, args.mlx_path, args.dtype or "float32"
            )
    except (ValueError, OSError) as e:  # GGUFError is a ValueError
        print(f"Error: {str(e).splitlines()[0] if str(e) else e!r}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"Wrote {out} ({_folder_size(out) / 1e6:.1f} MB) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
