"""The batched plan: input-stationary cell execution.

When a state h_j of a search cell is ready (a cell input or a finished node), the candidates of all the edges leaving
it run at once (:class:`fastnas.nn.state_candidates.StateCandidates`: parameter-free candidates once per state, the
convolutions, reductions and gates of all its edges as a few batched calls over stacked weights), and one
:func:`fastnas.ops.edge_sums` adds their weighted outputs to the running sums of the nodes they feed, its weights
picked by one indexing call (``torch.take``); a node is finished when its last source has run. DARTS's arithmetic
is unchanged (up to the order of a node's terms); what changes is how many calls compute it.

The cell's state dict keeps the per-edge names and shapes of the other plans (a state dict of any plan loads into
any other); the parameters the optimisers see are the stacked ones.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ... import ops
from ..state_candidates import StateCandidates
from .base import CellPlan, NodeSum, Plan, Runner, WeightPicker


class _RunBatched(nn.Module):
    """Where a candidate run by its state's :class:`StateCandidates` was: nothing of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this candidate runs batched with its state's other edges (StateCandidates)")


def edges_by_source(cell: nn.Module) -> list[list[int]]:
    """The edges leaving each state of ``cell`` (inputs 0 and 1, then the nodes), in node order."""
    sources: list[list[int]] = [[] for _ in range(len(cell.nodes) + 1)]
    for node in cell.nodes:
        for j, e in enumerate(node):
            sources[j].append(e)
    return sources


def _unstack(cell: nn.Module, named: dict[str, torch.Tensor], prefix: str, clone: bool) -> None:
    """Replace, in ``named``, each stacked tensor of ``cell`` (whose names begin with ``prefix``) by its per-edge
    tensors under their per-edge names."""
    for j, candidates in enumerate(cell.state_candidates):
        for name, source in candidates.sources.items():
            stored = named.pop(f"{prefix}state_candidates.{j}.{name}", None)
            if stored is not None:
                named.update({prefix + n: t.clone() if clone else t for n, t in source.unstack(stored).items()})


def _state_dict_per_edge(cell: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    _unstack(cell, state_dict, prefix, clone=True)


def _load_per_edge(cell: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for j, candidates in enumerate(cell.state_candidates):
        stored = dict(candidates.named_parameters(recurse=False)) | dict(candidates.named_buffers())
        for name, source in candidates.sources.items():
            keys = [prefix + n for n in source.names]
            if name in stored and all(k in state_dict for k in keys):
                # shared statistics (equal for every edge by construction): the first edge's copy is loaded
                tensors = [state_dict.pop(k) for k in keys]
                state_dict[f"{prefix}state_candidates.{j}.{name}"] = source.stack(tensors, stored[name].shape)


class BatchedCellPlan(CellPlan):
    def __init__(self, cell: nn.Module, runner: Runner) -> None:
        super().__init__(cell, runner)
        width = len(cell.active)
        self.sources = edges_by_source(cell)
        nodes = len(cell.nodes)
        for j, edges in enumerate(self.sources):  # state j feeds every node from max(j - 1, 0) on, in order
            targets = [i for e in edges for i, node in enumerate(cell.nodes) if e in node]
            if targets != list(range(max(j - 1, 0), nodes)):
                raise ValueError("the batched plan runs cells whose every node reads every earlier state")
        self.terms, self.positions = [], []
        for j, candidates in enumerate(cell.state_candidates):
            terms = candidates.terms + [(1, (c,)) for c in candidates.unbatched]  # the ops it does not know, last
            columns = [c for _, cols in terms for c in cols]
            self.terms.append([per_edge for per_edge, _ in terms])
            self.positions.append(tuple(tuple(e * width + c for c in columns) for e in self.sources[j]))
        self.pick = WeightPicker()

    def start(self) -> NodeSum:
        raise TypeError("the batched plan runs a cell's nodes together: call nodes()")

    def nodes(self, inputs: Sequence[torch.Tensor], weights: torch.Tensor,
              edge_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The nodes as running sums: each state in turn adds its edges' weighted candidates to the sums of the
        nodes not finished yet (one :func:`fastnas.ops.edge_sums`); the first of them is then finished."""
        cell = self.cell
        states, partial = list(inputs), None
        for j, candidates in enumerate(cell.state_candidates):
            h = states[j]
            terms = list(self.runner.module(candidates, h))  # (a compiled region under --compile)
            for c in candidates.unbatched:  # the ops it does not know, per edge
                terms.append(torch.cat([cell.edges[e][c](h) for e in self.sources[j]], 1))
            n, C = len(self.sources[j]), h.shape[1]
            # the weights of the state's edges [edges, candidates]: one indexing call
            sums = ops.edge_sums(terms, self.pick.block(weights, self.positions[j]), self.terms[j], C, partial)
            if j == 0:
                partial = sums
            elif n == 1:
                states.append(sums)
            else:  # the first node is finished; the others go on (channel slices, read where they are)
                node, partial = sums.split([C, (n - 1) * C], 1)
                states.append(node)
        return states[2:]


class BatchedPlan(Plan):
    """Each state's outgoing candidates as batched calls over stacked weights; one fused sum per node."""

    name = "batched"
    cell_plan = BatchedCellPlan

    def adapt(self, cell: nn.Module) -> None:
        cell.state_candidates = nn.ModuleList()
        for edges in edges_by_source(cell):
            if not edges:
                continue
            candidates = StateCandidates([list(enumerate(cell.edges[e])) for e in edges],
                                         [f"edges.{e}." for e in edges])
            for e in edges:  # what runs batched leaves the edge; the rest stays there, under its own name
                for c in range(len(cell.edges[e])):
                    if c not in candidates.unbatched:
                        cell.edges[e][c] = _RunBatched()
            cell.state_candidates.append(candidates)
        cell.register_state_dict_post_hook(_state_dict_per_edge)
        cell.register_load_state_dict_pre_hook(_load_per_edge)


def per_edge(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``named`` (e.g. ``{name: p.grad for name, p in model.named_parameters()}``) with each stacked tensor of the
    batched plan replaced by its per-edge tensors under the per-edge names (the state dict's)."""
    out = dict(named)
    for path, module in model.named_modules():
        if isinstance(getattr(module, "state_candidates", None), nn.ModuleList):
            _unstack(module, out, f"{path}." if path else "", clone=False)
    return out
