"""``torch.compile`` for the search supernet, region by region.

Compiling the whole supernet makes Inductor trace and optimise every cell and every candidate separately: on a
2-core CPU the full DARTS supernet takes about half an hour to compile. The supernet is a few kinds of small
modules repeated hundreds of times, so :func:`compile_regions` compiles each edge's candidates that have parameters
(one graph per edge, in which the compiler computes the candidates' shared ``relu(h)`` once) and each preprocessing
op as its own region. Regions of one kind (class and configuration) share one compiled function (parameters are
graph inputs, not constants: ``torch.compile`` lifts module parameters), so the full supernet needs under 30 graphs.
The fused ops (``mixed_sum``, the gates) stay opaque operators, the parameter-free candidates and the node sums run
between the regions, and the architecture weights never enter a compiled graph.

A region whose compilation fails runs eagerly from then on, and the run says so once per kind of region.
"""
from __future__ import annotations

import functools
import logging
import types
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("fastnas")

# each region kind has a code object of its own (see _own_code) holding an entry per state of the weights (live or
# frozen) and per AMP setting; the limits leave room for more, and for a whole-model compile in the same process
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


def _own_code(fn: Callable, index: int) -> Callable:
    """A copy of the plain function ``fn`` with a code object of its own. Dynamo keeps compiled entries per code
    object and checks their guards in turn on every call: one copy per region kind keeps that list to the kind's
    own one or two entries (weights live or frozen) instead of every shape of every module of the class."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_region{index}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def compile_regions(net: nn.Module, device_type: str = "cpu", per_edge: bool = True) -> int:
    """Compile the search supernet ``net`` (a :class:`fastnas.SuperNet`) region by region, in place; returns the
    number of regions. A region is all candidates of one edge that have parameters (:class:`EdgeCandidates`, fed
    to the node sum of the cell's default training path), or, in cells that take another path (partial channels,
    ``memory_efficient=False``) or with ``per_edge=False``, each such candidate on its own; and each preprocessing
    op. A region kind is a module
    class with one configuration (its ``repr``: channels, kernels, strides); the regions of a kind share one
    compiled function, and a compiler failure sends the whole kind back to eager execution. Parameter-free
    candidates (pooling) stay eager: they are recomputed in the backward and cost little. Calls without gradients
    (validation, genotype derivation) run eagerly. Call it once per network, after moving the network to its device
    and layout. Raises dynamo's recompile limits (process-wide) so that every region kind fits."""
    from .nn.operations import LeadingReLU

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           ACCUMULATED_RECOMPILE_LIMIT)
    options = dict(dynamic=False, options=inductor_options(device_type))
    kinds: dict[tuple, CompiledOrEager] = {}

    def region(module: nn.Module, method: str) -> functools.partial:
        """``module.method`` as a call of its kind's compiled function (which falls back, for the whole kind)."""
        function = getattr(type(module), method)
        key = (function, repr(module))
        if key not in kinds:
            kinds[key] = CompiledOrEager(_own_code(function, len(kinds)), type(module).__name__, training_only=True,
                                         **options)
        return functools.partial(kinds[key], module)

    regions = 0
    for cell in net.cells:
        # per edge, the candidates that are not parameter-free (skip included)
        kept = [[op for op, free in zip(edge, frees) if not free]
                for edge, frees in zip(cell.edges, cell.parameter_free)]
        if per_edge and cell.partial_channels == 1 and cell.recompute_parameter_free:  # the node sum takes edges
            cell.edge_regions = [region(EdgeCandidates(ops), "forward") for ops in kept]
            regions += len(kept)
        else:
            for op in (op for ops in kept for op in ops if not isinstance(op, nn.Identity)):
                if isinstance(op, LeadingReLU):  # the cell calls after_relu with the ReLU it shares
                    op.after_relu = region(op, "after_relu")
                op.forward = region(op, "forward")
                regions += 1
        for pre in (cell.preprocess0, cell.preprocess1):
            pre.forward = region(pre, "forward")
            regions += 1
    return regions


class EdgeCandidates(nn.Module):
    """The candidates of one edge that are not parameter-free (skip included), run on the edge's input: one region.
    Each candidate runs whole, its ReLU included; inside one graph the compiler computes relu(h) once for all."""

    def __init__(self, candidates: list[nn.Module]) -> None:
        super().__init__()
        self.candidates = nn.ModuleList(candidates)

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [op(h) for op in self.candidates]


def compiled_regions(net: nn.Module) -> list[CompiledOrEager]:
    """The region kinds behind each region of ``net``: its cells' edges and its modules' compiled methods."""
    calls = [call for cell in net.cells for call in (cell.edge_regions or [])]
    calls += [m.__dict__.get(method) for m in net.modules() for method in ("forward", "after_relu")]
    return [c.func for c in calls if isinstance(c, functools.partial) and isinstance(c.func, CompiledOrEager)]
