"""mlx_braces.blas: OpenBLAS loaded before MLX on Linux, and what happens otherwise.

Each case runs in a fresh Python process, since MLX binds its BLAS when mlx.core is
imported. Which library MLX's ``cblas_sgemm`` is bound to is read from libmlx.so's GOT
(``mlx_cblas_library``) and checked against /proc/self/maps.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the BLAS loader is Linux-only"
)

PROBE = r"""
import json, os, sys
{first}
import mlx.core as mx
import numpy as np
from mlx_braces import blas
a = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((80, 72)).astype(np.float32)
c = np.array(mx.array(a) @ mx.array(b), dtype=np.float64)
maps = {{line.split()[-1] for line in open("/proc/self/maps") if "/" in line}}
print(json.dumps({{
    "loaded": blas.loaded,
    "sgemm": blas.mlx_cblas_library("cblas_sgemm"),
    "sgesdd": blas.mlx_cblas_library("sgesdd_"),
    "reference": blas.mlx_uses_reference_blas(),
    "maps": sorted(p for p in maps if "blas" in p.lower() or "gfortran" in p),
    "err": float(np.abs(c - a.astype(np.float64) @ b.astype(np.float64)).max()),
}}))
"""


def probe(first: str = "import mlx_braces", **env: str) -> tuple[dict, list[str]]:
    """Run PROBE after ``first``; returns its report and its stderr lines."""
    environ = {k: v for k, v in os.environ.items() if k != "MLX_BRACES_BLAS"}
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **env},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr.splitlines()


def openblas_or_skip(report: dict) -> None:
    """Outside CI a machine without any OpenBLAS skips; in CI (.ci/run installs it) fail."""
    if report["loaded"] is None and not os.environ.get("CI"):
        pytest.skip(
            "no OpenBLAS can be loaded here (apt-get install libopenblas0-pthread)"
        )


def check_bound_to(report: dict, library: str) -> None:
    real = os.path.realpath(library)
    assert report["sgemm"] == real, report  # MLX's matmul calls go to this library
    assert report["sgesdd"] == real, report  # and so do its LAPACK calls
    assert real in report["maps"]
    assert not report["reference"]
    assert report["err"] < 1e-4  # equals numpy (float64) within fp32 rounding


def test_import_mlx_braces_first_binds_mlx_to_openblas():
    report, stderr = probe()
    openblas_or_skip(report)
    assert report["loaded"] is not None, stderr
    assert "openblas" in os.path.realpath(report["loaded"]).lower()
    check_bound_to(report, report["loaded"])
    assert not [line for line in stderr if line.startswith("mlx_braces:")]


def test_off_keeps_the_bundled_reference_blas():
    report, stderr = probe(MLX_BRACES_BLAS="off")
    assert report["loaded"] is None
    assert "mlx_cpu.libs/libblas" in report["sgemm"]
    assert report["reference"]
    # numpy's own (symbol-prefixed) scipy_openblas may be mapped; no other OpenBLAS
    assert not any("libopenblas" in p.lower() for p in report["maps"])
    assert report["err"] < 1e-4
    assert not [line for line in stderr if line.startswith("mlx_braces:")]


def test_importing_mlx_first_warns_once_in_one_line():
    first = "import mlx.core\nimport mlx_braces\nmlx_braces.blas._done = False\n"
    report, stderr = probe(first + "mlx_braces.blas.setup()")  # a 2nd call: no 2nd line
    assert report["loaded"] is None and report["reference"]
    lines = [line for line in stderr if line.startswith("mlx_braces:")]
    assert len(lines) == 1, stderr
    assert "import mlx_braces before mlx" in lines[0]
    assert "MLX_BRACES_BLAS=off" in lines[0]


@pytest.mark.parametrize("kind", ["missing", "not a library"])
def test_bad_path_warns_in_one_line_and_loads_nothing(tmp_path: Path, kind: str):
    path = tmp_path / "libopenblas.so.0"
    if kind == "not a library":
        path.write_text("not an ELF file\n")
    report, stderr = probe(MLX_BRACES_BLAS=str(path))
    assert report["loaded"] is None and report["reference"]
    lines = [line for line in stderr if line.startswith("mlx_braces:")]
    assert len(lines) == 1, stderr
    assert f"MLX_BRACES_BLAS={path}" in lines[0]
    assert ("no such file" if kind == "missing" else "cannot load") in lines[0]


def test_explicit_path_is_loaded():
    auto, _ = probe()
    openblas_or_skip(auto)
    report, stderr = probe(MLX_BRACES_BLAS=auto["loaded"])
    assert report["loaded"] == auto["loaded"], stderr
    check_bound_to(report, auto["loaded"])


def test_wheel_openblas_loads_without_a_system_libgfortran():
    """ngsolve-openblas needs libgfortran.so.5; the loader gives it mlx[cpu]'s copy."""
    from mlx_braces import blas

    wheels = [p for p in blas.wheel_candidates() if "ngsolve_openblas" in p]
    libs = [d for d in blas._gfortran_dirs() if d.name == "mlx_cpu.libs"]
    if not (wheels and libs):
        if os.environ.get("CI"):
            pytest.fail("ngsolve-openblas (a dependency on x86-64 Linux) is missing")
        pytest.skip("ngsolve-openblas is not installed")
    first = (  # blas.py on its own: the package would import mlx.core first
        "import importlib.util\nfrom pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('b', {blas.__file__!r})\n"
        "b = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(b)\n"
        f"b._load_beside_gfortran({wheels[0]!r}, Path({str(libs[0])!r}))"
    )
    env = {"MLX_BRACES_BLAS": "off"}  # nothing but the symlinked wheel library
    report, stderr = probe(first, **env)
    check_bound_to(report, wheels[0])
    gfortran = {p for p in report["maps"] if "gfortran" in p}  # no system copy
    assert os.path.realpath(glob.glob(str(libs[0] / "libgfortran*"))[0]) in gfortran
    assert all(Path(p).parent.name.endswith(".libs") for p in gfortran), gfortran


def test_nothing_found_says_the_apt_command_once(tmp_path: Path):
    from mlx_braces import blas

    bad = tmp_path / "libopenblas.so.0"
    bad.write_text("not an ELF file\n")
    code = (  # blas.py alone, with only an unloadable candidate to find
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('b', {blas.__file__!r})\n"
        "b = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(b)\n"
        f"b.system_candidates = lambda: [{str(bad)!r}]\nb.wheel_candidates = list\n"
        "print(b.setup())\nb._done = False\nprint(b.setup())\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "MLX_BRACES_BLAS"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ
    )
    assert r.returncode == 0 and r.stdout.split() == ["None", "None"], r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_braces: no OpenBLAS found")
    assert "apt-get install libopenblas0-pthread" in lines[0] and str(bad) in lines[0]
