"""Roofline inputs: the bytes each fused op must move at its shape, and the measured copy bandwidth of a device.

Every op here is memory-bound (a few flops per element), so the fastest any implementation can run is
``bytes_moved / copy_bandwidth``: the *floor*. The report shows each measured time as ``floor / time`` (1.0 = at the
floor). Two floors are recorded: ``copy_time(bytes)``, the measured time of one ``dst.copy_(src)`` that moves the same
number of bytes (same cache levels as the op at its working-set size; the report's *of floor* column), and the
device's streaming copy bandwidth (machine_info; shown in the report's header). Copy bandwidth is the best of several ``dst.copy_(src)`` of a buffer far larger than the caches (256 MiB on
the CPU with the benchmark's threads, 1 GiB on a GPU), counted as 2 x bytes per copy (one read, one write).
"""
from __future__ import annotations

import time

import torch

K = 7  # inputs of mixed_sum in the benchmarks (the 7 candidates with parameters or pooling of a node's edge)


def bytes_moved(op: str, mode: str, shape, dtype: torch.dtype, k: int = K) -> int:
    """Bytes a fused implementation must read and write (activation-sized tensors only; parameters and the per-channel
    pooled vectors are negligible). ``mode``: ``fwd`` or ``fwdbwd`` (forward + backward)."""
    n, c, h, w = shape
    elem = torch.empty(0, dtype=dtype).element_size()
    act = n * c * h * w * elem
    small = n * h * w * elem  # one [N, 1, H, W] plane
    fwd = {
        "mixed_sum": (k + 1) * act,  # read K inputs, write 1
        "channel_pool": act,
        "channel_scale": 2 * act,
        "spatial_pool": act + 2 * small,
        "spatial_scale": 2 * act + small,
        "channel_gate": 3 * act,  # pool reads x; scale reads x, writes y
        "spatial_gate": 3 * act + 3 * small,
    }[op]
    bwd = {
        "mixed_sum": (1 + 2 * k) * act,  # read g and every x, write every grad x
        "channel_pool": act,
        "channel_scale": 3 * act,
        "spatial_pool": act + 2 * small,
        "spatial_scale": 3 * act + small,
        "channel_gate": 4 * act + 2 * act,  # scale bwd + pool bwd + summing the two grads of x
        "spatial_gate": 4 * act + 2 * act + 4 * small,
    }[op]
    return fwd if mode == "fwd" else fwd + bwd


def _copy_seconds(numel: int, device: str, repeats: int, warmup: int) -> list[float]:
    """Times (s) of ``repeats`` ``dst.copy_(src)`` of ``numel`` float32 elements after ``warmup`` untimed ones (which
    also fault the pages in)."""
    dev = torch.device(device)
    src = torch.ones(numel, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: str = "cpu", nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured copy bandwidth of ``device`` in bytes/s (2 x bytes per copy, best of ``repeats``)."""
    if nbytes is None:
        nbytes = (1 << 30) if torch.device(device).type == "cuda" else (256 << 20)
    return 2 * nbytes / min(_copy_seconds(nbytes // 4, device, repeats, warmup=2))


_COPY_TIMES: dict = {}


def copy_time(nbytes: int, device: str = "cpu", repeats: int = 20) -> float:
    """Median time (s) of ``dst.copy_(src)`` moving ``nbytes`` in all (reads + writes), cached per size and device."""
    key = (nbytes, device)
    if key not in _COPY_TIMES:  # read n/2 bytes, write n/2
        times = _copy_seconds(max(1, nbytes // 8), device, repeats, warmup=3)
        _COPY_TIMES[key] = sorted(times)[len(times) // 2]
    return _COPY_TIMES[key]


if __name__ == "__main__":
    import os

    torch.set_num_threads(int(os.environ.get("FASTNAS_BENCH_THREADS", "2")))
    print(f"cpu copy bandwidth ({torch.get_num_threads()} threads): {copy_bandwidth('cpu') / 1e9:.1f} GB/s")
    if torch.cuda.is_available():
        print(f"cuda copy bandwidth ({torch.cuda.get_device_name()}): {copy_bandwidth('cuda') / 1e9:.0f} GB/s")
