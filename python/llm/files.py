"""Files out and in. Output is atomic: nothing half-written is ever left at the destination,
and what is left there has the permissions of any new file (some writers, safetensors among
them, create theirs 0600). Text input is strict UTF-8: a file that is not text is refused
with its name and line, not silently garbled."""

from __future__ import annotations

import contextlib
import gzip
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success rename it over `path`.

    Write the whole file to the yielded path. os.replace is atomic on POSIX and
    Windows, so readers see either the old file or the complete new one; if writing
    fails the temporary file is removed and `path` is untouched. The file gets
    new_file_mode(), whatever mode its writer created it with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_file_mode() -> int:
    """The permissions an ordinary new file gets here: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically (atomic_output): readers, or a run killed
    mid-write, never see half of it."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def read_utf8(path: str | os.PathLike) -> str:
    """A UTF-8 text file as a string (.gz decompressed first); ValueError naming the file and
    the line of the first byte that is not UTF-8."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({error.reason}); convert it to UTF-8 first") from None
