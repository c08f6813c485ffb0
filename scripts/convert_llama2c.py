"""Convert a llama2.c checkpoint and tokenizer into an mlx-lm model folder.

Usage::

    python scripts/convert_llama2c.py CHECKPOINT.bin TOKENIZER.bin OUT_DIR \\
        [--dtype float32|float16|bfloat16]

The conversion logic lives in :mod:`mlx_braces.conversion.llama2c`; this is its CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from mlx_braces.conversion.llama2c import main
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mlx_braces.conversion.llama2c import main

if __name__ == "__main__":
    raise SystemExit(main())
