"""A run folder, owned by one run at a time.

A run takes its folder with an exclusive ``flock`` on the folder itself, held until the process exits (the kernel
drops it when a run is killed, so a crash leaves nothing stale, and the folder holds only the run's outputs). A second run into the same folder is refused while
the first holds it. A folder that already holds a run's outputs is written only to continue that run (``--resume``)
or with ``--overwrite``, which first removes the outputs it names, so that nothing of the old run mixes with the new.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import RunFolderError

# what a search or a retraining writes; their presence means the folder holds a run. One list, here, rather than
# one beside each writer: a folder must be recognised (and --overwrite must clear it) whichever command claims it,
# and a command does not import the other's writers
RUN_OUTPUTS = ("config.json", "log.txt", "checkpoint.pt", "alphas.json", "alphas.png", "genotype.json",
               "genotype.txt", "analysis.txt", "normal.png", "reduce.png", "metrics.json", "model.safetensors",
               "model.json", "data.json", "collapse.png", "seeds.json", "seeds.txt", "seeds.png",
               "events.out.tfevents.*")  # the last: TensorBoard's (fastnas.tracking)

_held: dict[Path, int] = {}  # folder -> its locked descriptor, kept open while the command runs


def claim(path: str | Path, *, resume: bool = False, overwrite: bool = False, resumable: bool = True) -> Path:
    """Create (when needed) and lock the run folder ``path``; returns it.

    Raises :class:`RunFolderError` when the folder cannot be created or written, when another run holds it, or when
    it holds a run's outputs and neither ``resume`` nor ``overwrite`` is given (the message suggests ``--resume``
    only for a ``resumable`` command)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        os.close(fd)
        raise RunFolderError(f"cannot write into the run folder {path}: permission denied")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunFolderError(f"the run folder {path} is in use by another run; wait for it to finish or "
                             f"choose another --run-dir") from None
    existing = [p.name for pattern in RUN_OUTPUTS for p in sorted(path.glob(pattern))]
    if existing and not resume:
        if not overwrite:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            advice = f"continue it with --resume {path}, " if resumable else ""
            raise RunFolderError(f"{path} already holds a run ({', '.join(existing[:4])}"
                                 f"{', ...' if len(existing) > 4 else ''}); {advice}pass --overwrite to replace it, "
                                 f"or choose another --run-dir")
        for name in existing:
            (path / name).unlink()
    _held[path.resolve()] = fd
    return path


def release(path: str | Path) -> None:
    """Give the folder up (the command that claimed it has ended; a process may run several commands)."""
    fd = _held.pop(Path(path).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_all() -> None:
    """Give up every folder this process holds."""
    for path in list(_held):
        release(path)

