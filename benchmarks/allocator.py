"""The process's heap for timing: glibc's trimming off, so page faults do not decide the medians.

In an op benchmark the heap is small, and glibc gives freed memory at its top back to the system (and serves big
blocks from fresh mappings) between calls: the next call's outputs then fault their pages in again, about 1 ms per
4 MiB tensor on a 2-core machine, more than a fused kernel takes, and whether a call faults depends on where earlier
frees left the heap's top, not on the op. In a whole training step the heap stays big and faults are rare
(first-order search steps at batch 32: 0 to 200 faults in most steps, now and then one with ~10 000, a few % of a
3 s step). ``keep_heap`` sets glibc's trim and mmap thresholds high so every provider's timing sees a warm heap, as
inside a step. ``FASTNAS_BENCH_MALLOC=system`` keeps glibc's defaults (to measure the faulting regime).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30
regime = "system (not configured)"  # what keep_heap set, for the results


def keep_heap() -> None:
    """Configure the allocator as FASTNAS_BENCH_MALLOC asks; ``regime`` names the regime in force."""
    global regime
    regime = _configure()


def _configure() -> str:
    if os.environ.get("FASTNAS_BENCH_MALLOC", "keep") == "system":
        return "system"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "system (no glibc mallopt)"
    ok = mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1 and mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
    return "keep (glibc trim and mmap thresholds 1 GiB)" if ok else "system (mallopt refused)"
