"""Load OpenBLAS before MLX on Linux: mlx[cpu] bundles netlib's slow reference BLAS.

An OpenBLAS loaded with ``RTLD_GLOBAL`` before ``mlx.core`` is imported serves MLX's
cblas and LAPACK calls instead (fp32 matmul ~4 → ~150 GFLOP/s on 2 cores). Python
binds extension modules with ``RTLD_NOW``, so once ``mlx.core`` is imported the choice
is made: :func:`setup` runs first thing in ``import mlx_braces``.

``MLX_BRACES_BLAS``: unset (auto), ``off``, or the path of a BLAS library. Auto tries a
system OpenBLAS (Debian's ``libopenblas0-pthread``), then the ``ngsolve-openblas`` wheel
(a dependency on x86-64 Linux), then the ``cmeel-openblas`` wheel. Never on macOS, where
MLX uses Accelerate and Metal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import platform
import shutil
import struct
import sys
import tempfile
from pathlib import Path

ENV = "MLX_BRACES_BLAS"
APT_FIX = "apt-get install libopenblas0-pthread"
PIP_FIX = "pip install ngsolve-openblas"

loaded: str | None = None  # the library setup() loaded, if any
_done = False
_warned: set[str] = set()


def _warn(message: str) -> None:
    """Print ``message`` as one line on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"mlx_braces: {message}", file=sys.stderr, flush=True)


def system_candidates() -> list[str]:
    """System OpenBLAS libraries that exist (Debian/Ubuntu multiarch, Fedora, Arch)."""
    triplet = f"{platform.machine()}-linux-gnu"
    paths = [
        f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{triplet}/openblas-serial/libopenblas.so.0",
        f"/usr/lib/{triplet}/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]
    found = [p for p in paths if os.path.exists(p)]
    name = ctypes.util.find_library("openblas")  # e.g. "libopenblas.so.0" (ld cache)
    if name and not found:
        found.append(name)
    return found


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def wheel_candidates() -> list[str]:
    """OpenBLAS libraries shipped by pip wheels: ngsolve-openblas, cmeel-openblas."""
    found = []
    ngsolve = _package_dir("ngsolve_openblas")
    if ngsolve is not None:
        found += sorted(glob.glob(str(ngsolve / "libopenblas*.so*")))
    for entry in sys.path:
        lib = Path(entry or ".") / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if lib.is_file():
            found.append(str(lib))
            break
    return found


def _gfortran_dirs() -> list[Path]:
    """Wheel folders that ship libgfortran under a hashed name (mlx[cpu], numpy)."""
    dirs = []
    for package, libs in (("mlx", "mlx_cpu.libs"), ("numpy", "numpy.libs")):
        where = _package_dir(package)
        if where is not None and glob.glob(str(where.parent / libs / "libgfortran*")):
            dirs.append(where.parent / libs)
    return dirs


def _load_beside_gfortran(path: str, libs: Path) -> None:
    """Load ``path`` with a ``libgfortran.so.5`` beside it, taken from ``libs``.

    OpenBLAS wheels need ``libgfortran.so.5``; wheels ship it only under hashed names
    (auditwheel), which do not satisfy that NEEDED entry. A library whose RPATH is
    ``$ORIGIN`` (ngsolve-openblas) finds it in a folder of symlinks: the library as
    ``libopenblas.so.0``, the hashed libgfortran as ``libgfortran.so.5``, and its own
    dependencies under their names. The folder is removed once the libraries are mapped.
    """
    tmp = tempfile.mkdtemp(prefix="mlx_braces_blas.")
    try:
        for lib in libs.iterdir():
            os.symlink(lib, os.path.join(tmp, lib.name))
        gfortran = sorted(libs.glob("libgfortran*"))[0]
        os.symlink(gfortran, os.path.join(tmp, "libgfortran.so.5"))
        os.symlink(os.path.realpath(path), os.path.join(tmp, "libopenblas.so.0"))
        ctypes.CDLL(os.path.join(tmp, "libopenblas.so.0"), mode=ctypes.RTLD_GLOBAL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: str) -> None:
    """dlopen ``path`` into the global scope; raises OSError with the loader's reason."""
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError as e:
        if "libgfortran" not in str(e):
            raise
        error = e
    for libs in _gfortran_dirs():
        try:
            _load_beside_gfortran(path, libs)
            return
        except OSError as e:
            error = e
    raise error


def setup() -> str | None:
    """Load the BLAS that ``MLX_BRACES_BLAS`` asks for; returns its path, if any.

    Runs once per process and does nothing off Linux. If ``mlx.core`` is already
    imported it loads nothing, and warns in one line if MLX runs on its reference BLAS.
    A path that cannot be loaded gives a one-line warning and no other BLAS: the user
    named that library, so none is substituted silently.
    """
    global loaded, _done
    if _done or not sys.platform.startswith("linux"):
        return loaded
    _done = True
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() == "off":
        return None
    if "mlx.core" in sys.modules:
        if mlx_uses_reference_blas():
            _warn(
                "mlx.core was imported before mlx_braces, so MLX runs on its slow "
                "bundled reference BLAS; import mlx_braces before mlx (or set "
                f"{ENV}=off to silence this)"
            )
        return None
    if choice:
        if not os.path.exists(choice):
            _warn(f"{ENV}={choice}: no such file; MLX keeps its reference BLAS")
            return None
        try:
            _load(choice)
        except OSError as e:
            _warn(f"{ENV}={choice}: cannot load ({e}); MLX keeps its reference BLAS")
            return None
        loaded = choice
        return loaded
    errors = []
    for path in system_candidates() + wheel_candidates():
        try:
            _load(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        loaded = path
        return loaded
    why = f" ({'; '.join(errors)})" if errors else ""
    pip = f" (or {PIP_FIX})" if platform.machine() == "x86_64" else ""
    _warn(
        f"no OpenBLAS found{why}, so MLX's CPU matmuls use its slow reference BLAS; "
        f"fix: {APT_FIX}{pip}, or set {ENV}=off to silence this"
    )
    return None


# ---------------------------------------------------------------------------
# Which library MLX's cblas_sgemm is bound to (read from libmlx.so's GOT)


def _mapped(pattern: str = "") -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of this process's mappings matching ``pattern``."""
    rows = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and pattern in parts[5]:
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    rows.append((start, end, int(parts[2], 16), parts[5].strip()))
    except OSError:
        pass
    return rows


def _got_offsets(file: str, symbol: str) -> tuple[list[int], int]:
    """GOT slots (offsets from the load base) where ``file`` binds ``symbol``.

    Also returns the first PT_LOAD's virtual address. ELF64 little-endian only.
    """
    with open(file, "rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02" or head[5] != 1:  # 64-bit little-endian
            return [], 0
        phoff, shoff = struct.unpack_from("<QQ", head, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 54)
        f.seek(phoff)
        phdrs = f.read(phentsize * phnum)
        first_load = min(
            struct.unpack_from("<Q", phdrs, i * phentsize + 16)[0]
            for i in range(phnum)
            if struct.unpack_from("<I", phdrs, i * phentsize)[0] == 1  # PT_LOAD
        )
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
            for i in range(shnum)
        ]

        def read(index: int) -> bytes:
            s = sections[index]
            f.seek(s[4])
            return f.read(s[5])

        offsets = []
        for index, s in enumerate(sections):
            if s[1] != 4:  # SHT_RELA
                continue
            syms, strings = read(s[6]), read(sections[s[6]][6])
            rela = read(index)
            for i in range(0, len(rela), 24):
                r_offset, r_info = struct.unpack_from("<QQ", rela, i)
                sym = r_info >> 32
                if sym == 0 or (sym + 1) * 24 > len(syms):
                    continue
                name_at = struct.unpack_from("<I", syms, sym * 24)[0]
                end = strings.index(b"\0", name_at)
                if strings[name_at:end] == symbol.encode():
                    offsets.append(r_offset)
    return offsets, first_load


def mlx_cblas_library(symbol: str = "cblas_sgemm") -> str | None:
    """The file that MLX's ``symbol`` is bound to in this process (after mlx.core).

    Reads libmlx.so's GOT slot for ``symbol`` and finds the mapped file that holds the
    address (/proc/self/maps). None if mlx.core is not loaded or it cannot be told.
    """
    if "mlx.core" not in sys.modules:
        return None
    mapped = [m for m in _mapped("/libmlx.so") if m[2] == 0]
    if not mapped:
        return None
    start, _, _, file = min(mapped)
    try:
        offsets, first_load = _got_offsets(file, symbol)
    except (OSError, struct.error, ValueError, IndexError):
        return None
    base = start - (first_load & ~0xFFF)
    maps = _mapped()
    for offset in offsets:
        address = ctypes.c_void_p.from_address(base + offset).value or 0
        for lo, hi, _, path in maps:
            if lo <= address < hi:
                return path
    return None


def mlx_uses_reference_blas() -> bool:
    """True if MLX's matmul is bound to the reference BLAS bundled in mlx_cpu.libs."""
    library = mlx_cblas_library()
    if library is not None:
        return "mlx_cpu.libs" in library and "openblas" not in library.lower()
    paths = {m[3] for m in _mapped()}
    return any("mlx_cpu.libs/libblas" in p for p in paths) and not any(
        "openblas" in p.lower() and "scipy_openblas" not in p for p in paths
    )
