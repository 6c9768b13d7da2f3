"""Atomic writes: every file of a run is written beside its place and renamed onto it.

A reader (or a run interrupted mid-write) sees the old file or the new one, never half of one. Two forms:
:func:`write_together` for bytes (several files committed together: all written and flushed first, then all
renamed, so a full disk leaves every file as it was), and :func:`replacing` for writers that want a file name
(safetensors, the exporters). Each file gets the permissions of a file written directly (the umask's).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def new_file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_file_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A temporary file in ``path``'s folder, for an atomic rename onto ``path``: (descriptor, name). ``mkstemp``
    creates it 0600; it is given the umask's mode, which the rename keeps."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, new_file_mode())
    return fd, tmp


def write_together(files: dict[Path, bytes]) -> None:
    """Write every file, or none: each is written and flushed to a temporary file beside it, then all are renamed
    into place (in the given order). On an error (a full disk) the temporary files are removed and the old files
    stay as they were."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            fd, tmp = temp_file_beside(path)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def write_text(text: str, path: str | Path) -> None:
    """One text file, atomically."""
    write_together({Path(path): text.encode()})


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name beside ``path`` for a writer that takes a name; when the block ends without an error
    the file gets the umask's mode (a writer may have made it anew) and is renamed onto ``path``; it is removed
    otherwise."""
    path = Path(path)
    fd, tmp = temp_file_beside(path, suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
