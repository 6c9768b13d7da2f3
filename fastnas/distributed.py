"""Several processes under ``torchrun``: process group, gradient averaging, rank-0-only outputs, failure handling.

``torchrun --nproc_per_node=N -m fastnas.search ...`` (and ``fastnas.train``) starts N processes, each with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment. :func:`setup` joins them into one process group
(NCCL on GPUs, each process on ``cuda:LOCAL_RANK``; gloo on CPUs). Outside torchrun every function here is a
no-op and the single-process path is untouched.

Every rank starts from the same weights (same seed, then a broadcast from rank 0) and applies the same averaged
gradients with the same optimiser state, so all ranks hold bitwise the same parameters after every step;
:func:`verify_sync` checks that. Collectives time out after ``timeout`` seconds, so a rank that died without
reaching its error handler does not hold the others forever.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import traceback
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE) with 2+ processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    if not launched() or active():
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1, but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_mean(tensors: Sequence[torch.Tensor | None]) -> None:
    """Average ``tensors`` across ranks in place (``None`` entries are skipped), one collective per dtype.

    Every rank receives the same bytes, so identical optimiser steps follow on every rank."""
    if not active():
        return
    n = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(n)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sums of a few numbers over the ranks (in float64)."""
    if not active():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_meter(meter) -> None:
    """Turn a per-rank :class:`fastnas.runtime.Meter` into the global one (sums of loss, correct, count)."""
    if active():
        loss, correct, n = all_reduce_sum([meter.loss, meter.correct, meter.n])
        meter.set_totals(loss, round(correct), round(n))


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def sync_buffers(module: nn.Module) -> None:
    """Make batch-norm statistics identical across ranks: floating buffers become the mean over ranks (each rank
    saw its own shard), the others (``num_batches_tracked``) rank 0's."""
    if not active():
        return
    buffers = list(module.buffers())
    with torch.no_grad():
        all_reduce_mean([b for b in buffers if b.is_floating_point()])
        for b in buffers:
            if not b.is_floating_point():
                dist.broadcast(b, src=0)


def state_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    out = {}
    for name, t in named_tensors:
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(data).hexdigest()[:16]
    return out


def verify_sync(module: nn.Module, what: str = "weights") -> str:
    """Check that ``module``'s parameters and buffers are bitwise identical on every rank; raises on all ranks if
    not, naming the first tensors that differ. Returns a short digest of the whole state."""
    digest = state_digest(module.state_dict().items())
    total = hashlib.sha256("".join(digest.values()).encode()).hexdigest()[:16]
    if not active():
        return total
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    differing = [name for name in digest if len({g[name] for g in gathered}) > 1]
    if differing:
        raise RuntimeError(f"--verify-sync: {what} differ across ranks in {len(differing)} tensors "
                           f"({', '.join(differing[:5])}{', ...' if len(differing) > 5 else ''})")
    return total


# -- command lines --------------------------------------------------------------------------------------------------
RESUME_OPTIONS = ("--resume", "--no-progress", "--epochs", "--verify-sync", "--dist-timeout", "--threads")  # honoured on resume


def add_cli_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (torchrun --nproc_per_node=N -m ...)")
    g.add_argument("--verify-sync", action="store_true",
                   help="after each epoch, check that every process holds bitwise the same weights (and alphas); "
                        "stop with an error if not")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="how long a process waits for the others in a collective before the job fails")


def run_main(prog: str, body: Callable[[], int], known_errors: tuple[type[BaseException], ...]) -> int:
    """Run a command line's body on this rank. A known error prints one line (exit 2), anything else its
    traceback (exit 1), prefixed with the rank under torchrun; the process group is then left, so torchrun stops
    the other ranks rather than leaving them waiting in a collective."""
    tag = f"{prog} [rank {os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')}]" if launched() else prog
    try:
        return body()
    except known_errors as exc:
        print(f"{tag}: error: {exc}", file=sys.stderr, flush=True)
        _record(exc)
        return 2
    except KeyboardInterrupt:
        print(f"{tag}: interrupted; the last completed epoch is in the checkpoint (resume with --resume)",
              file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        if not launched():
            raise
        print(f"{tag}: error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        _record(exc)
        return 1
    finally:
        teardown()


def _record(exc: BaseException) -> None:
    """Hand the error to torchrun, whose failure summary then shows it (and which rank failed first)."""
    if launched() and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)
