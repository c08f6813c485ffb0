"""Replace several files of an adapter folder all at once: old set or new, never a mix.

POSIX renames one file atomically, not several. An adapter is a set (config, weights,
resume state, metrics) whose members must match, so a commit goes:

1. each new file is written under a hidden temporary name in the folder and fsynced;
2. a journal, ``.commit.json`` = {final name: temporary name}, is written to its own
   temporary name, fsynced and renamed into place: **this rename is the commit**;
3. each temporary file is renamed over its final name;
4. the journal is deleted.

A kill before step 2 leaves the old files in place (plus temporary files, which the
next commit removes); a kill after it leaves the new set, split between temporary and
final names. Readers use :func:`resolve`, which reads a name through the journal, so
they see exactly one of the two; the next commit first completes (:func:`recover`) a
commit a kill interrupted. With no journal, the files under their own names are the
set: mlx-lm's layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

JOURNAL_NAME = ".commit.json"
KILL_ENV = "MLX_BRACES_TEST_KILL_AT"  # tests: SIGKILL this process at that point

# The temporary names of an adapter folder's files (temp_path's, for every write
# there): ".{stem}.XXXXXXXX{suffix}", XXXXXXXX from mkstemp.
_TEMP = re.compile(
    r"^\.(adapter_config|adapters|\d{7}_adapters|resume|metrics|commit|write_test)"
    r"\.[a-z0-9_]{8}\.(json|jsonl|safetensors|tmp)$"
)


class CommitError(ValueError, OSError):
    """A journal that cannot be read (one line; CLIs print ValueErrors as one)."""


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$MLX_BRACES_TEST_KILL_AT`` is ``name`` (tests only).

    Tests kill a real training run at a chosen instant (e.g. ``journal@2``: right
    after iteration 2's commit point) to check what a ``kill -9`` there leaves.
    """
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def temp_path(folder: Path, name: str) -> Path:
    """A new empty hidden file beside ``folder/name``, with the usual file mode."""
    stem, dot, suffix = name.lstrip(".").partition(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=dot + suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make adapters private
    return Path(tmp)


def journal(folder: str | Path) -> dict[str, str] | None:
    """The pending renames {final: temporary} of an interrupted commit, or None."""
    file = Path(folder) / JOURNAL_NAME
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CommitError(f"{file}: cannot read ({e.strerror})") from None
    try:
        files = json.loads(text)["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CommitError(
            f"{file}: not a commit journal of mlx_braces; move it away to read "
            "the folder's files as they are"
        ) from None
    return files


def resolve(folder: str | Path, name: str) -> Path:
    """The file that holds ``name`` of ``folder``'s current set (see module doc)."""
    folder = Path(folder)
    pending = journal(folder) if folder.is_dir() else None
    if pending and name in pending and (folder / pending[name]).is_file():
        return folder / pending[name]
    return folder / name


def snapshot(folder: str | Path, names) -> tuple:
    """Identity (inode, size, mtime) of each resolved file: unchanged = not replaced."""
    out = []
    for name in names:
        try:
            st = resolve(folder, name).stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        _fsync(folder)


def recover(folder: str | Path) -> None:
    """Finish a commit that a kill interrupted after its commit point."""
    folder = Path(folder)
    pending = journal(folder)
    if pending is None:
        return
    for final, tmp in pending.items():
        if (folder / tmp).is_file():
            os.replace(folder / tmp, folder / final)
    _fsync_dir(folder)
    (folder / JOURNAL_NAME).unlink()
    _fsync_dir(folder)


def remove_temporaries(folder: str | Path) -> None:
    """Delete temporary files that killed writes left (none is in a journal)."""
    folder = Path(folder)
    pending = set((journal(folder) or {}).values())
    for p in folder.iterdir():
        if _TEMP.match(p.name) and p.name not in pending and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


Writer = Callable[[Path], None]


def commit(folder: str | Path, files: dict[str, Writer], tag: str = "") -> None:
    """Replace ``folder``'s files named in ``files`` together (old set or new on a kill).

    The one atomic write of mlx_braces (a single file is a commit of one).
    Each value writes the new content of its file to the temporary path it is given.
    ``tag`` names the commit's kill points for tests (``write:NAME@tag``,
    ``journal@tag``, ``rename:NAME@tag``, ``done@tag``). On an error nothing
    changes and the temporary files are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)
    remove_temporaries(folder)
    written: dict[str, Path] = {}
    try:
        for name, write in files.items():
            tmp = written[name] = temp_path(folder, name)
            write(tmp)
            _fsync(tmp)
            kill_point(f"write:{name}@{tag}")
        record = temp_path(folder, JOURNAL_NAME)
        written[JOURNAL_NAME] = record
        entries = {k: v.name for k, v in written.items() if k != JOURNAL_NAME}
        record.write_text(json.dumps({"files": entries}, indent=1) + "\n")
        _fsync(record)
        os.replace(record, folder / JOURNAL_NAME)  # the commit point
    except BaseException:
        for tmp in written.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    _fsync_dir(folder)
    kill_point(f"journal@{tag}")
    for name, tmp in written.items():
        if name != JOURNAL_NAME:
            os.replace(tmp, folder / name)
            kill_point(f"rename:{name}@{tag}")
    _fsync_dir(folder)
    (folder / JOURNAL_NAME).unlink()
    _fsync_dir(folder)
    kill_point(f"done@{tag}")


@contextlib.contextmanager
def locked(folder: str | Path):
    """Hold an exclusive lock on ``folder`` (one writer at a time; a kill releases it)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CommitError(
                f"{folder}: another process is writing to this adapter folder "
                "(a training run?); wait for it or choose another --adapter-path"
            ) from None
        yield
    finally:
        os.close(fd)
