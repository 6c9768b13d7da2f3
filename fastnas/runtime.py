"""What search and retraining share at run time: device, seeding, AMP, run folders and logging."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import distributed, ops
from .errors import ConfigError, DivergedError
from .nn.plans.execution import AMP_DTYPES

log = logging.getLogger("fastnas")


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one. Under torchrun, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if dev.type == "cuda" and distributed.launched():
        if dev.index is not None:
            raise ConfigError(f"--device {name} under torchrun: each process takes cuda:LOCAL_RANK; pass --device "
                              f"cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
        dev = torch.device("cuda", distributed.local_rank())
    return dev


def setup_processes(device: str, timeout_s: float, run_dir: Path | None) -> bool:
    """Join the process group when under torchrun. Rank 0 logs to the run folder and stderr; the other ranks write
    no files and print only warnings, tagged with their rank. Returns whether this process writes outputs."""
    distributed.setup(pick_device(device), timeout_s)
    if distributed.is_main():
        setup_logging(run_dir)
        return True
    log.handlers.clear()
    log.setLevel(logging.WARNING)
    log.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {distributed.rank()}] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    return False


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed every generator from (seed, epoch, rank): each rank draws its own augmentations and drop-path masks,
    and a resumed run draws what the uninterrupted one did."""
    seed_everything((seed * 1_000_003 + epoch * 9_973 + distributed.rank() * 101) % 2**31)


def diverged(what: str, run: str, epoch: int, step: int, run_dir: Path | None, option: str) -> DivergedError:
    """The error that stops a run whose ``what`` became NaN or infinite at ``step`` (from 0) of epoch ``epoch``
    (completed epochs before it), logged to the run's log too. The last completed epoch's checkpoint is left as it
    is: the caller raises before writing anything of the failed epoch."""
    kept = (f"the checkpoint of epoch {epoch} is kept in {run_dir}" if run_dir is not None and epoch > 0
            else "no epoch had completed, so there is no checkpoint")
    message = (f"{what} became NaN or infinite at epoch {epoch + 1}, step {step + 1}; the {run} stops ({kept}). "
               f"Lower {option} or --grad-clip and start again")
    log.error(message)
    return DivergedError(message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_backend(name: str, device: torch.device) -> str:
    """Select the fused-op backend globally and return the concrete one used on ``device``."""
    ops.set_backend(name)
    try:
        return ops.resolve_backend(device)
    except ops.BackendUnavailable as exc:
        raise ConfigError(str(exc)) from None


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """The memory layout of a run: ``setting`` when given; auto (None) is channels_last on the CPU, where oneDNN's
    convolutions and ATen's pooling are much faster in NHWC (a search step about 1.4x on the quick preset and 1.8x on
    the full supernet), and PyTorch's default layout elsewhere."""
    return device.type == "cpu" if setting is None else bool(setting)




def autocast(amp: str, device: torch.device, cache_enabled: bool = True):
    """Autocast for ``amp`` (off, bf16, fp16); ``cache_enabled=False`` where a CUDA graph records the forward (the
    cache's copies of the weights would be freed inside the recording)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache_enabled)


def new_run_dir(root: str | Path, prefix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{prefix}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{prefix}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def setup_logging(run_dir: Path | None, verbose: bool = True) -> None:
    """Log to the run folder's ``log.txt`` and to stderr (through tqdm, so progress bars stay intact)."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    if verbose:
        log.addHandler(_TqdmHandler(fmt))


class _TqdmHandler(logging.Handler):
    def __init__(self, fmt: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def json_text(obj: Any) -> str:
    """``obj`` as strict JSON: a NaN or infinite float is written as null (JSON has no token for it)."""
    return json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n"


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(obj: Any, path: Path) -> None:
    from .atomic import write_text

    write_text(json_text(obj), path)


class Meter:
    """Running sums of loss and correct predictions, and throughput in images per second. The sums stay on the
    device (an update makes no step wait for it); reading ``loss``, ``correct`` or an average fetches them."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # [loss × images, correct] in float64 on the device
        self._read: tuple[float, int] | None = (0.0, 0)
        self.n = 0
        self.start = time.perf_counter()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        b = target.shape[0]
        sums = torch.stack([loss.detach().double() * b, (logits.argmax(dim=1) == target).sum().double()])
        self._sums = sums if self._sums is None else self._sums + sums
        self._read = None
        self.n += b

    def totals(self) -> tuple[float, int]:
        """(sum of loss × images, correct predictions), fetched from the device once per update."""
        if self._read is None:
            loss, correct = self._sums.tolist()
            self._read = (loss, int(correct))
        return self._read

    def set_totals(self, loss: float, correct: int, n: int) -> None:
        self._sums, self._read, self.n = None, (float(loss), int(correct)), int(n)

    @property
    def loss(self) -> float:
        return self.totals()[0]

    @property
    def correct(self) -> int:
        return self.totals()[1]

    @property
    def avg_loss(self) -> float:
        return self.loss / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.n, 1)

    @property
    def throughput(self) -> float:
        return self.n / max(time.perf_counter() - self.start, 1e-9)


@torch.no_grad()
def evaluate(forward, loader, criterion, device: torch.device, amp: str = "off",
             channels_last: bool = False) -> Meter:
    meter = Meter()
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with autocast(amp, device):
            logits = forward(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            loss = criterion(logits.float(), y)
        meter.update(loss, logits, y)
    return meter


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    out: dict = {}
    t = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - t


def inductor_cache_counts() -> tuple[int, int]:
    """(hits, misses) of Inductor's FX graph cache so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
