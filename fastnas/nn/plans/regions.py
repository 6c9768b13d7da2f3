"""The compiled-regions plan: another plan's node sums, with the cell's modules run as compiled regions.

Compiling the whole supernet makes Inductor trace and optimise every cell and every candidate separately: on a
2-core CPU the full DARTS supernet takes about half an hour to compile. The supernet is a few kinds of small modules
repeated hundreds of times, so each edge's candidates that have parameters (:class:`EdgeCandidates`: one graph per
edge, in which the compiler computes the candidates' shared relu(h) once) and each preprocessing op are a region of
their own. Regions of one kind (class and configuration, its ``repr``) share one compiled function (parameters are
graph inputs, not constants: ``torch.compile`` lifts module parameters), so the full supernet needs under 30 graphs.
The fused ops stay opaque operators, the parameter-free candidates and the node sums run between the regions, the
architecture weights never enter a compiled graph, and calls without gradients (validation) run eagerly. A region
kind whose compilation fails runs eagerly from then on (:class:`fastnas.compilation.CompiledOrEager`).
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
from torch import nn

from ... import compilation
from ...errors import ConfigError
from .base import CellPlan, Plan, Runner
from .fused_norms import FusedNormsPlan
from .memory import MemoryPlan

# each region kind has a code object of its own (see _own_code) holding an entry per state of the weights (live or
# frozen) and per AMP setting; the limits leave room for more, and for a whole-model compile in the same process
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 4096


def _own_code(fn: Callable, index: int) -> Callable:
    """A copy of the plain function ``fn`` with a code object of its own. Dynamo keeps compiled entries per code
    object and checks their guards in turn on every call: one copy per region kind keeps that list to the kind's
    own one or two entries (weights live or frozen) instead of every shape of every module of the class."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_region{index}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class EdgeCandidates(nn.Module):
    """The candidates of one edge that are not parameter-free (skip included), run whole on the edge's input: one
    region, in which the compiler computes their shared relu(h) once."""

    def __init__(self, candidates: list[nn.Module]) -> None:
        super().__init__()
        self.candidates = nn.ModuleList(candidates)

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [op(h) for op in self.candidates]


class CompiledRunner:
    """A cell's modules as compiled regions: one per edge (its candidates that are not parameter-free), one per
    preprocessing op; the parameter-free candidates run eagerly. Under the batched plan each state's
    :class:`~fastnas.nn.state_candidates.StateCandidates` is a region instead of the edges."""

    def __init__(self, cell: nn.Module, region: Callable[[nn.Module], Callable]) -> None:
        self.candidates = [[(op, free) for op, free in zip(edge, frees)]
                           for edge, frees in zip(cell.edges, cell.parameter_free)]
        batched = list(getattr(cell, "state_candidates", ()))
        self.edges = [] if batched else [region(EdgeCandidates([op for op, free in edge if not free]))
                                         for edge in self.candidates]
        self.preprocess = {module: region(module) for module in (cell.preprocess0, cell.preprocess1, *batched)}

    def module(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess[module](x)

    def kept(self, e: int, h: torch.Tensor, relu: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
        return self.edges[e](h)

    def all(self, e: int, h: torch.Tensor, relu: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
        kept = iter(self.edges[e](h))
        return [op(h) if free else next(kept) for op, free in self.candidates[e]]

    def regions(self) -> list[Callable]:
        return self.edges + list(self.preprocess.values())


class RegionsPlan(Plan):
    """``base``'s node sums (the memory plan's for the fused-norms plan: the regions run whole candidates, their
    final norms included) with each cell's modules run as compiled regions for ``device_type``. Raises dynamo's
    recompile limits (process-wide) so that every region kind fits."""

    name = "regions"

    def __init__(self, base: Plan | None = None, device_type: str = "cpu") -> None:
        if isinstance(base, (RegionsPlan, FusedNormsPlan)):
            raise ConfigError(f"compiled regions run whole candidates: they cannot wrap {base!r}")
        self.base = base or MemoryPlan()
        self.partial = self.base.partial
        self.device_type = device_type
        self.kinds: dict[tuple, compilation.CompiledOrEager] = {}
        self.regions = 0  # how many regions the prepared cells run (each edge's, each preprocessing op)
        self.reported: set[str] = set()  # the region kinds whose compiler failure was reported
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, ACCUMULATED_RECOMPILE_LIMIT)

    def adapt(self, cell: nn.Module) -> None:
        self.base.adapt(cell)

    def prepare(self, cell: nn.Module, runner: Runner | None = None) -> CellPlan:
        return self.base.prepare(cell, CompiledRunner(cell, self.region))

    def compiled(self) -> list[compilation.CompiledOrEager]:
        """The compiled function of each region kind."""
        return list(self.kinds.values())

    def region(self, module: nn.Module) -> Callable[..., Any]:
        """``module.forward`` as a call of its kind's compiled function (which falls back, for the whole kind)."""
        function = type(module).forward
        key = (function, repr(module))
        self.regions += 1
        if key not in self.kinds:
            self.kinds[key] = compilation.CompiledOrEager(
                _own_code(function, len(self.kinds)), type(module).__name__, training_only=True,
                reported=self.reported, dynamic=False, options=compilation.inductor_options(self.device_type))
        return functools.partial(self.kinds[key], module)

    def __repr__(self) -> str:
        return f"RegionsPlan({self.base!r}, {self.device_type!r})"


def regions_of(plan: Plan) -> RegionsPlan | None:
    """The compiled-regions plan in ``plan`` (itself, or the one a wrapper such as the auxiliary skip holds)."""
    while not isinstance(plan, RegionsPlan):
        plan = getattr(plan, "base", None)
        if plan is None:
            return None
    return plan
