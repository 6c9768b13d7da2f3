"""TensorBoard event files in the run folder (``tensorboard --logdir runs``).

On by default when the ``tensorboard`` package is installed (``pip install fastnas[tensorboard]``); ``--tensorboard``
asks for it, ``--no-tensorboard`` or ``FASTNAS_TENSORBOARD=0`` in the environment turn the default off. Only the
main process writes (it alone has a run folder). Per epoch: every number of the epoch's history record (losses,
accuracies, collapse indicators, expected cost), the learning rate and images per second as scalars; a run adds
its pictures and text (:meth:`fastnas.runloop.RunLoop.track`). The configuration is written once as
hyper-parameters.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV = "FASTNAS_TENSORBOARD"
EVENT_FILES = "events.out.tfevents.*"  # what SummaryWriter names its files


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of ``record`` (nested dicts flattened to ``a/b``), without lists, strings and None."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


class Tracker:
    """A run's TensorBoard writer: scalars, figures and text under the run's kind (``search/...``)."""

    def __init__(self, writer: Any, kind: str) -> None:
        self.writer, self.kind = writer, kind

    @classmethod
    def open(cls, run_dir: Path, enabled: bool | None, kind: str, config: dict[str, Any],
             metric: str) -> "Tracker | None":
        """A tracker writing into ``run_dir``, or None when TensorBoard is off (``enabled`` None: the default)."""
        if enabled is None:
            enabled = available() and os.environ.get(ENV, "1") != "0"
        if not enabled:
            return None
        if not available():
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install 'fastnas[tensorboard]'")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        writer = SummaryWriter(log_dir=str(run_dir))
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        for summary in hparams(values, {f"{kind}/{metric}": 0.0}):
            writer.file_writer.add_summary(summary)
        return cls(writer, kind)

    def epoch(self, epoch: int, record: dict[str, Any], extra: dict[str, float]) -> None:
        for tag, value in _numbers({**record, **extra}, f"{self.kind}/").items():
            if not tag.endswith("/epoch"):
                self.writer.add_scalar(tag, value, epoch)

    def figure(self, tag: str, figure: Any, epoch: int) -> None:
        self.writer.add_figure(f"{self.kind}/{tag}", figure, epoch, close=True)

    def text(self, tag: str, text: str, epoch: int) -> None:
        self.writer.add_text(f"{self.kind}/{tag}", text, epoch)

    def close(self) -> None:
        self.writer.close()
