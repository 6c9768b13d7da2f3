"""``torch.compile`` for the search supernet, region by region.

Compiling the whole supernet makes Inductor trace and optimise every cell and every candidate separately: on a
2-core CPU the full DARTS supernet takes about half an hour to compile. The supernet is a few kinds of small
modules repeated hundreds of times, so :func:`compile_regions` compiles each candidate op that has parameters (after
the ReLU that the cell shares between candidates) and each preprocessing op as its own region. Regions of one class
and one shape share their compiled code (parameters are graph inputs, not constants: ``torch.compile`` lifts module
parameters), so the full supernet needs about 40 graphs, which compile in about a minute cold here and come from
Inductor's on-disk cache in seconds. The fused ops (``mixed_sum``, the gates) stay opaque operators between the
regions, and the architecture weights never enter a compiled graph.

A region whose compilation fails runs eagerly from then on, and the run says so once per kind of region.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("fastnas")

# dynamo keys compiled code by the Python function: every SepConv shares SepConv.after_relu, and each shape, mode
# (train/eval) and frozen-or-not state of the weights is one more entry under it
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 4096


def inductor_options(device_type: str) -> dict[str, Any]:
    """Inductor settings for the regions. On the CPU, ``force_layout_optimization`` keeps graphs that hold only
    convolution backwards (the backward of a region) in the channels_last layout that oneDNN runs fastest;
    without it Inductor copies a depthwise convolution's gradient and input to NCHW before its backward."""
    return {"force_layout_optimization": True} if device_type == "cpu" else {}


class CompiledOrEager:
    """``torch.compile(fn)`` that runs ``fn`` eagerly from the first compiler failure on, reporting the failure once
    per ``label`` (over all instances). With ``training_only``, calls made without gradients (validation) run
    eagerly too, so that they compile no graphs of their own."""

    _reported: set[str] = set()

    def __init__(self, fn: Callable, label: str = "model", training_only: bool = False,
                 **compile_kwargs: Any) -> None:
        self.fn = fn
        self.label = label
        self.training_only = training_only
        self.compiled = torch.compile(fn, **compile_kwargs)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed or (self.training_only and not torch.is_grad_enabled()):
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # a compiler failure must not end the run
            self.failed = True
            if self.label not in CompiledOrEager._reported:
                CompiledOrEager._reported.add(self.label)
                text = str(exc).strip()
                first_line = text.splitlines()[0][:200] if text else ""
                log.warning(f"torch.compile failed for {self.label} ({type(exc).__name__}: {first_line}); "
                            f"running it eagerly")
            return self.fn(*args, **kwargs)


def compile_regions(net: nn.Module, device_type: str = "cpu") -> int:
    """Compile the search supernet ``net`` (a :class:`fastnas.SuperNet`) region by region, in place; returns the
    number of regions. Parameter-free candidates (pooling, skip) stay eager: they are recomputed in the backward
    and cost little. Calls without gradients (validation, genotype derivation) run eagerly. Raises dynamo's
    recompile limits (process-wide) so that every region kind fits."""
    from .nn.operations import LeadingReLU
    from .nn.search_cell import is_parameter_free

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           ACCUMULATED_RECOMPILE_LIMIT)
    options = dict(training_only=True, dynamic=False, options=inductor_options(device_type))
    regions = 0
    for cell in net.cells:
        for edge in cell.edges:
            for op in edge:
                if is_parameter_free(op) or isinstance(op, nn.Identity):
                    continue
                label = type(op).__name__
                if isinstance(op, LeadingReLU):  # the cell calls after_relu with the ReLU it shares
                    op.after_relu = CompiledOrEager(op.after_relu, label, **options)
                op.forward = CompiledOrEager(op.forward, label, **options)
                regions += 1
        for pre in (cell.preprocess0, cell.preprocess1):
            pre.forward = CompiledOrEager(pre.forward, type(pre).__name__, **options)
            regions += 1
    return regions
