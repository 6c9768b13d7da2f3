"""Checks of a run's values that never make a step wait for the device.

A step records what must stay finite (the loss, the architecture weights) as flags on the device; the flags are read
together a couple of times a second and at the end of the epoch. A step then has no host synchronisation (what CUDA
graphs need, and what lets the host queue the next step while the GPU runs this one), and a diverged run still stops
naming the first step that went wrong, before anything of its epoch is written.
"""
from __future__ import annotations

import time

import torch


class FiniteWatch:
    """Pending finiteness checks, each (step, what, option, device flag), read every ``every_s`` seconds."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self._pending: list[tuple[int, str, str, torch.Tensor]] = []
        self._last = time.monotonic()

    def expect(self, step: int, what: str, option: str, *tensors: torch.Tensor) -> None:
        """Record that ``tensors`` hold finite values only; ``what`` names them and ``option`` the setting to lower
        if they do not."""
        flags = [torch.isfinite(t).all() for t in tensors]
        self._pending.append((step, what, option, flags[0] if len(flags) == 1 else torch.stack(flags).all()))

    def due(self) -> bool:
        """Whether it is time to read the pending flags (:meth:`first_failure`)."""
        return time.monotonic() - self._last >= self.every_s

    def first_failure(self) -> tuple[str, int, str] | None:
        """(what, step, option) of the first pending check that failed, or None; all pending flags are read in one
        transfer and dropped."""
        self._last = time.monotonic()
        pending, self._pending = self._pending, []
        if not pending:
            return None
        good = torch.stack([flag for *_, flag in pending]).tolist()
        return next(((what, step, option) for (step, what, option, _), ok in zip(pending, good) if not ok), None)
