"""A training step captured as a CUDA graph and replayed (``--cuda-graphs``).

A search step at DARTS's sizes is thousands of small kernels; on a GPU the host's time to launch them, not the GPU's
time to run them, sets the pace. A CUDA graph launches the whole recorded step (both halves of the bilevel step with
their optimiser steps, or the retraining step) at once. What makes that possible is that no step reads a value back
to the host (``tests/test_host_sync.py``).

The step runs on static input buffers: each call copies its batch into them and replays the graph, whose outputs are
the same tensors each time. The first ``warmup`` steps run eagerly on a side stream (they are real steps; CUDA's
libraries and the optimisers' state are set up there), the next one is captured and replayed. Settings that are plain
numbers in the step (the learning rate of the epoch, drop path's probability, DARTS-'s skip coefficient, whether the
architecture step runs) are fixed in a graph, so the loop calls :meth:`GraphedStep.recapture` at each epoch. A batch
of another shape (the last, smaller batch of an epoch) runs eagerly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Outputs = Any


class CudaCapture:
    """Captures and replays on the current CUDA device (``torch.cuda.CUDAGraph``), one memory pool for all graphs."""

    def __init__(self) -> None:
        self.pool = None

    def warmup(self, fn: Callable[[], Outputs]) -> Outputs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable[[], Outputs]) -> Callable[[], Outputs]:
        """``fn`` recorded (not run); returns what replays it and gives its outputs (the same tensors each time)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()

        def replay() -> Outputs:
            graph.replay()
            return out
        return replay


class GraphedStep:
    """``step(*inputs) -> outputs`` (tensors) run as a replayed CUDA graph on static copies of its inputs."""

    def __init__(self, step: Callable[..., Outputs], warmup: int = 3, capture: Any = None) -> None:
        self.step, self.warmup_left = step, warmup
        self.capture = capture if capture is not None else CudaCapture()
        self.static: list[torch.Tensor] | None = None
        self.replay: Callable[[], Outputs] | None = None

    def recapture(self) -> None:
        """Drop the graph: the next step is captured anew (a setting fixed in it has changed)."""
        self.replay = None

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        if self.static is not None and [t.shape for t in inputs] != [t.shape for t in self.static]:
            return self.step(*inputs)  # a batch of another size: eagerly
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self.capture.warmup(lambda: self.step(*inputs))
        if self.static is None:
            self.static = [t.detach().clone() for t in inputs]
        else:
            for buffer, t in zip(self.static, inputs):
                buffer.copy_(t, non_blocking=True)
        if self.replay is None:
            self.replay = self.capture.capture(lambda: self.step(*self.static))
        return self.replay()


def check_supported(device: torch.device, cfg: Any, distributed: bool) -> str | None:
    """Why ``--cuda-graphs`` cannot run a run configured by ``cfg`` (None when it can)."""
    if device.type != "cuda":
        return "--cuda-graphs needs a CUDA device"
    if cfg.amp == "fp16":
        return "--cuda-graphs with --amp fp16 is refused: the loss scaler reads its scale back each step; use bf16"
    if distributed:
        return "--cuda-graphs runs in one process (under torchrun the gradients' all-reduce is not captured)"
    if cfg.compile:
        return "--cuda-graphs with --compile is refused: choose one (torch.compile has its own CUDA graphs)"
    if getattr(cfg, "alpha_noise", 0.0):
        return "--cuda-graphs with --alpha-noise is refused: SDARTS's noise is drawn on the host each step"
    if getattr(cfg, "budget", None):
        return "--cuda-graphs with --budget is refused: the cost tables are copied to the device each step"
    return None
