"""What the plans share: the interface a search cell calls, and the eager way of running its modules."""
from __future__ import annotations

from typing import Callable, ClassVar, Protocol, Sequence

import torch
from torch import nn

from ..operations import layers

NodeSum = Callable[[Sequence[torch.Tensor], range, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``node_sum(states, edges, weights, edge_weights)``: the node fed by ``edges`` (their rows of ``weights``)."""


def is_parameter_free(op: nn.Module) -> bool:
    """No parameters: recomputing it in the backward is safe even when the weights are swapped by
    ``functional_call`` (second order), and cheap (pooling and affine-free batch norm)."""
    return next(op.parameters(), None) is None and not isinstance(op, nn.Identity)


def after_relu(op: nn.Module) -> list[Callable] | None:
    """The layers of ``op`` after the ReLU it begins with, or None when it does not begin with one."""
    chain = layers(op)
    return chain[1:] if isinstance(chain[0], nn.ReLU) else None


def apply_all(chain: Sequence[Callable], x: torch.Tensor) -> torch.Tensor:
    """x through each layer of ``chain`` in turn."""
    for layer in chain:
        x = layer(x)
    return x


class SharedReLU:
    """relu(state j), computed once per cell pass for all the candidates that begin with it (instead of each
    candidate storing its own copy for the backward)."""

    def __init__(self) -> None:
        self.relus: dict[int, torch.Tensor] = {}

    def of(self, j: int, h: torch.Tensor) -> torch.Tensor:
        if j not in self.relus:
            self.relus[j] = torch.relu(h)
        return self.relus[j]


class WeightPicker:
    """Entries of a node's weights [edges, ops] as one vector, picked by one indexing call (not one call per entry),
    with a constant 1 after them where asked (the weight of a share already summed), or as a matrix (:meth:`block`).
    The index tensors are made once per (positions, device)."""

    def __init__(self) -> None:
        self.indices: dict[tuple, torch.Tensor] = {}

    def __call__(self, node_weights: torch.Tensor, positions: tuple[int, ...], one: bool = False) -> torch.Tensor:
        """``node_weights.flatten()[positions]``, then a 1 if ``one``."""
        n = node_weights.numel()
        key = (positions, one, n, node_weights.device)
        index = self.indices.get(key)
        if index is None:  # the 1 is at position n of the padded vector below
            index = self.indices[key] = torch.tensor(positions + ((n,) if one else ()), device=node_weights.device)
        flat = node_weights.reshape(-1)
        if one:
            flat = torch.nn.functional.pad(flat, (0, 1), value=1.0)
        return flat.index_select(0, index)

    def block(self, weights: torch.Tensor, positions: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """``weights.flatten()[positions]`` as a matrix (one row per tuple), by one ``torch.take``."""
        key = (positions, weights.device)
        index = self.indices.get(key)
        if index is None:
            index = self.indices[key] = torch.tensor(positions, device=weights.device)
        return torch.take(weights, index)


class Runner(Protocol):
    """How a cell's modules run: eagerly (:class:`EagerRunner`) or as compiled regions
    (:class:`fastnas.nn.plans.regions.CompiledRunner`)."""

    def module(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A preprocessing op on x."""

    def kept(self, e: int, h: torch.Tensor, relu: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
        """The outputs of edge ``e``'s candidates that are not parameter-free, in order. ``relu()`` gives relu(h)
        for the candidates that begin with a ReLU to start from (None: each applies its own)."""

    def all(self, e: int, h: torch.Tensor, relu: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
        """The outputs of all of edge ``e``'s candidates, in order."""


class EagerRunner:
    """The cell's modules as they are."""

    def __init__(self, cell: nn.Module) -> None:
        self.candidates = [[(op, after_relu(op)) for op in edge] for edge in cell.edges]
        self.kept_candidates = [[c for c, free in zip(edge, frees) if not free]
                                for edge, frees in zip(self.candidates, cell.parameter_free)]

    def module(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def kept(self, e: int, h: torch.Tensor, relu: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
        return [_run(op, rest, h, relu) for op, rest in self.kept_candidates[e]]

    def all(self, e: int, h: torch.Tensor, relu: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
        return [_run(op, rest, h, relu) for op, rest in self.candidates[e]]


def _run(op: nn.Module, rest: list[Callable] | None, h: torch.Tensor,
         relu: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    if rest is None or relu is None:
        return op(h)
    return apply_all(rest, relu())


class CellPlan:
    """One cell's node sums under a plan: ``run`` runs a preprocessing op, ``nodes`` computes the intermediate
    nodes (by default one :data:`NodeSum` at a time: ``start()`` begins a pass of the cell and returns it)."""

    def __init__(self, cell: nn.Module, runner: Runner) -> None:
        self.cell = cell
        self.runner = runner

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.runner.module(module, x)

    def start(self) -> NodeSum:
        raise NotImplementedError

    def nodes(self, inputs: Sequence[torch.Tensor], weights: torch.Tensor,
              edge_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The cell's intermediate nodes from its two preprocessed inputs: DARTS's loop, one node sum at a time."""
        node_sum, states = self.start(), list(inputs)
        for edges in self.cell.nodes:
            states.append(node_sum(states, edges, weights, edge_weights))
        return states[2:]


class Plan:
    """A way to execute the node sums Σ w·op(h) of a network's search cells, built once for the network
    (:func:`fastnas.nn.plans.make_plan`). ``prepare(cell)`` binds it to one cell when the network is built;
    ``reason`` says why the factory chose it."""

    name: ClassVar[str] = ""
    cell_plan: ClassVar[type[CellPlan]] = CellPlan
    # the cells this plan runs: 1 (full width) or partial channels (PC-DARTS)
    partial: bool = False
    reason: str = ""

    def adapt(self, cell: nn.Module) -> None:
        """Make the cell's modules what this plan runs: once, when the cell is built, before :meth:`prepare`.
        Nothing by default; a wrapper passes it to the plan it wraps."""

    def prepare(self, cell: nn.Module, runner: Runner | None = None) -> CellPlan:
        """The plan of ``cell``; its modules run on ``runner`` (eagerly by default)."""
        return self.cell_plan(cell, runner or EagerRunner(cell))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
