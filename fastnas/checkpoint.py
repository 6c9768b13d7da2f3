"""Atomic checkpoints and exact resumption.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the old one, so
an interrupted run never leaves a half-written file. The files of one epoch (the checkpoint and the JSON history
beside it) are committed together by :func:`write_together`: all are written first, and only then renamed, so a
full disk leaves every file at the previous epoch. Loading uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError


def new_file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_file_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A temporary file in ``path``'s folder, for an atomic rename onto ``path``: (descriptor, name). ``mkstemp``
    creates it 0600; it is given the umask's mode, which the rename keeps, so that every output has the
    permissions of a file written directly."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, new_file_mode())
    return fd, tmp


def torch_bytes(obj: Any) -> bytes:
    """``obj`` serialised as :func:`torch.save` writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


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


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{path} is not a fastnas checkpoint")
    return obj


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
