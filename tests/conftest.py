"""Import mlx_braces before any test module imports mlx, so MLX binds to OpenBLAS."""

import mlx_braces  # noqa: F401  (loads the BLAS first: see mlx_braces/blas.py)
