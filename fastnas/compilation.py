"""``torch.compile`` for the search supernet and the evaluation network.

:class:`CompiledOrEager` compiles a callable and falls back to eager execution on a compiler failure; the search
cells' compiled regions are a plan (:class:`fastnas.nn.plans.RegionsPlan`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("fastnas")


def inductor_options(device_type: str) -> dict[str, Any]:
    """Inductor settings for the regions. On the CPU, ``force_layout_optimization`` keeps graphs that hold only
    convolution backwards (the backward of a region) in the channels_last layout that oneDNN runs fastest;
    without it Inductor copies a depthwise convolution's gradient and input to NCHW before its backward."""
    return {"force_layout_optimization": True} if device_type == "cpu" else {}


class CompiledOrEager:
    """``torch.compile(fn)`` that runs ``fn`` eagerly from the first compiler failure on, reporting the failure once
    per ``label`` among the instances that share ``reported`` (the labels already reported; by default, its own).
    With ``training_only``, calls made without gradients (validation) run eagerly too, so that they compile no
    graphs of their own."""

    def __init__(self, fn: Callable, label: str = "model", training_only: bool = False,
                 reported: set[str] | None = None, **compile_kwargs: Any) -> None:
        self.fn = fn
        self.label = label
        self.training_only = training_only
        self.reported = set() if reported is None else reported
        self.compiled = torch.compile(fn, **compile_kwargs)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed or (self.training_only and not torch.is_grad_enabled()):
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # a compiler failure must not end the run
            self.failed = True
            if self.label not in self.reported:
                self.reported.add(self.label)
                text = str(exc).strip()
                first_line = text.splitlines()[0][:200] if text else ""
                log.warning(f"torch.compile failed for {self.label} ({type(exc).__name__}: {first_line}); "
                            f"running it eagerly")
            return self.fn(*args, **kwargs)
