"""The DARTS search cell with node-level fusion of the MixedOps, and PC-DARTS partial channels.

In DARTS every edge is a MixedOp, Σ_o w_o · o(h), and a node sums its incoming edges. Here each intermediate node is
one fused :func:`fastnas.ops.mixed_sum` over all candidate outputs of all its incoming edges, which is the same sum.
``none`` is never evaluated (its weight multiplies zeros), and ``skip_connect`` at stride 1 hands its input over
without a copy.

With partial channels K (PC-DARTS, Xu et al., 2020) each edge runs its candidates on the first C/K channels only and
passes the rest by (max-pooled at stride 2); edge-normalisation weights β scale each edge. Channel shuffle is a
permutation, so the node Σ_j β_j · shuffle(cat(Σ_o w_jo o(x_j[:C/K]), x_j[C/K:])) is computed as
shuffle(cat(mixed_sum over all candidates with weights β_j·w_jo, mixed_sum over the bypasses with weights β_j)):
still one fused sum per node and per part.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from .. import ops
from ..errors import ConfigError
from ..space import channel_attention_op, make_op
from ..ops import prefers_channels_last
from ..ops import normalized_mixed_sum
from .attention import DEFAULT_REDUCTION
from .operations import FactorizedReduce, LeadingReLU, ReLUConvBN
from .recompute import RecomputableBatchNorm, recompute


def search_candidate(name: str, C: int, stride: int, partial_channels: int = 1) -> nn.Module:
    """A candidate op as the DARTS search MixedOp builds it: affine-free, pooling followed by affine-free BN.

    With partial channels the channel-attention bottleneck keeps the width it has on all C channels
    (``max(1, C // r)``), so sampling channels does not shrink the gate's MLP to nothing."""
    width = C // partial_channels
    if name == "channel_attention" and partial_channels > 1:
        op = channel_attention_op(max(1, DEFAULT_REDUCTION // partial_channels))(width, stride, False)
    else:
        op = make_op(name, width, stride, affine=False)
    if "pool" in name:
        op = nn.Sequential(op, RecomputableBatchNorm(width, affine=False))
    return op


def is_parameter_free(op: nn.Module) -> bool:
    """No parameters: recomputing it in the backward is safe even when the weights are swapped by
    ``functional_call`` (second order), and cheap (pooling and affine-free batch norm)."""
    return next(op.parameters(), None) is None and not isinstance(op, nn.Identity)


def _shared_relu(h: torch.Tensor, j: int, relus: dict[int, torch.Tensor]) -> torch.Tensor:
    """relu(state j), computed once per forward for all the candidates that begin with it."""
    if j not in relus:
        relus[j] = torch.relu(h)
    return relus[j]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class SearchCell(nn.Module):
    def __init__(self, primitives: Sequence[str], steps: int, multiplier: int, c_prev_prev: int, c_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, partial_channels: int = 1) -> None:
        super().__init__()
        if partial_channels < 1 or C % partial_channels:
            raise ConfigError(f"partial channels {partial_channels} must divide the cell width {C}")
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.partial_channels = partial_channels
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, C, 1, 1, 0, affine=False)
        # the columns of the architecture weights that have an op to run ('none' is skipped)
        self.active = [k for k, p in enumerate(primitives) if p != "none"]
        self.edges = nn.ModuleList()
        self.strides = []
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.strides.append(stride)
                self.edges.append(nn.ModuleList(
                    search_candidate(primitives[k], C, stride, partial_channels) for k in self.active))
        # PC-DARTS: the bypassed channels of a stride-2 edge are max-pooled (ceil, so odd sizes match the ops)
        self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True) if partial_channels > 1 and reduction else None
        # which candidates (by position among the active ops) are parameter-free, per edge
        self.parameter_free = [[is_parameter_free(op) for op in edge] for edge in self.edges]
        self.recompute_parameter_free = True
        self.share_relu = True
        # the node sums apply the candidates' final batch norms where the cpu backend's fused kernel applies
        self.fuse_norms = True
        # per edge, a callable h -> outputs of the edge's candidates that are not parameter-free, in order (set by
        # fastnas.compilation.compile_regions; a plain attribute, so neither a submodule nor in the state dict)
        self.edge_regions: list | None = None

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``weights``: [edges, ops] softmax weights of this cell type; ``edge_weights``: [edges] (partial channels)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        relus: dict[int, torch.Tensor] = {}  # relu(state j), computed once for all candidates that start with it
        active = weights[:, self.active] if len(self.active) != weights.shape[1] else weights
        k = self.partial_channels
        offset = 0
        for _ in range(self.steps):
            n_in = len(states)
            node_weights = active[offset:offset + n_in]
            if k == 1 and self.recompute_parameter_free and torch.is_grad_enabled():
                states.append(self._node_recomputing_parameter_free(states, offset, node_weights, relus))
            elif k == 1:
                outputs = [self._run(op, h, j, relus) for j, h in enumerate(states) for op in self.edges[offset + j]]
                states.append(ops.mixed_sum(outputs, node_weights.reshape(-1)))
            else:
                states.append(self._partial_node(states, offset, node_weights, edge_weights[offset:offset + n_in],
                                                 relus))
            offset += n_in
        return torch.cat(states[-self.multiplier:], dim=1)

    def _run(self, op: nn.Module, h: torch.Tensor, j: int, relus: dict[int, torch.Tensor]) -> torch.Tensor:
        if self.share_relu and isinstance(op, LeadingReLU):
            return op.after_relu(_shared_relu(h, j, relus))
        return op(h)

    def _kept_outputs(self, e: int, h: torch.Tensor, j: int, relus: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of edge ``e``'s candidates that are not parameter-free, in order (its compiled region if any)."""
        if self.edge_regions is not None:
            return self.edge_regions[e](h)
        return [self._run(op, h, j, relus) for op, free in zip(self.edges[e], self.parameter_free[e]) if not free]

    def _node_recomputing_parameter_free(self, states: list[torch.Tensor], offset: int,
                                         node_weights: torch.Tensor, relus: dict[int, torch.Tensor]) -> torch.Tensor:
        """The node sum with the parameter-free candidates' share computed under :func:`recompute`: neither their
        outputs nor their internals (max-pool indices, batch-norm inputs) are stored for the backward."""
        fuse = self._fuses_norms(states[0])
        terms, free = [], []  # terms: (output, or input of a final batch norm the node sum applies; that norm; weight)
        for j, h in enumerate(states):
            e = offset + j
            if fuse:
                outs = [self._split_norm(op, h, j, relus)
                        for op, is_free in zip(self.edges[e], self.parameter_free[e]) if not is_free]
            else:
                outs = [(out, None) for out in self._kept_outputs(e, h, j, relus)]
            kept_c = [c for c, is_free in enumerate(self.parameter_free[e]) if not is_free]
            terms += [(t, bn, node_weights[j, c]) for (t, bn), c in zip(outs, kept_c)]
            free += [(j, c) for c, is_free in enumerate(self.parameter_free[e]) if is_free]
        settings = next(((bn.momentum, bn.eps) for _, bn, _ in terms if bn is not None), None)
        # one momentum and eps for the fused norms: a norm with other settings runs by itself
        terms = [(bn(t), None, w) if bn is not None and (bn.momentum, bn.eps) != settings else (t, bn, w)
                 for t, bn, w in terms]
        normalized = [(t, bn, w) for t, bn, w in terms if bn is not None]
        kept = [t for t, bn, _ in terms if bn is None]
        kept_w = [w for _, bn, w in terms if bn is None]
        if not free and not normalized:
            return ops.mixed_sum(kept, node_weights.reshape(-1))
        share = [self._recomputed_share(states, offset, node_weights, free)] if free else []
        one = [torch.ones((), dtype=node_weights.dtype, device=node_weights.device)] if free else []
        if normalized:
            return normalized_mixed_sum([(t, bn) for t, bn, _ in normalized],
                                        kept + [s.to(normalized[0][0].dtype) for s in share],
                                        torch.stack([w for _, _, w in normalized] + kept_w + one))
        if not kept:
            return share[0]
        return ops.mixed_sum(kept + [share[0].to(kept[0].dtype)], torch.stack(kept_w + one))

    def _recomputed_share(self, states: list[torch.Tensor], offset: int, node_weights: torch.Tensor,
                          free: list[tuple[int, int]]) -> torch.Tensor:
        """Σ of the parameter-free candidates (state j, position c) of a node, under :func:`recompute`."""
        edges = self.edges[offset:offset + len(states)]
        backend = ops.get_backend()  # the backward's re-run must use the backend of this forward

        def free_share(free_w: torch.Tensor, *hs: torch.Tensor) -> torch.Tensor:
            # the candidates' own kernels (pooling, batch norm) follow the selection too
            scope = contextlib.nullcontext() if torch.compiler.is_compiling() else ops.backend(backend)
            with scope:
                return ops.mixed_sum([edges[j][c](hs[j]) for j, c in free], free_w, backend=backend)

        free_w = torch.stack([node_weights[j, c] for j, c in free])
        return recompute(free_share, free_w, *states)

    def _fuses_norms(self, like: torch.Tensor) -> bool:
        """Whether this node sum applies its candidates' final batch norms itself (the ``cpu`` backend's
        ``normalized_mixed_sum``: the normalised outputs are never written): eager, channels_last, float32/64."""
        return (self.fuse_norms and self.share_relu and self.edge_regions is None and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and like.dtype in (torch.float32, torch.float64)
                and prefers_channels_last(like) and not torch.is_autocast_enabled(like.device.type)
                and ops.cpu_kernel("normalized_mixed_sum", like.device) is not None)

    def _split_norm(self, op: nn.Module, h: torch.Tensor, j: int,
                    relus: dict[int, torch.Tensor]) -> tuple[torch.Tensor, nn.Module | None]:
        """(z, bn) when ``op`` ends with a batch norm the fused node sum can apply, else (op's output, None)."""
        split = op.split_norm_after_relu(_shared_relu(h, j, relus)) if isinstance(op, LeadingReLU) else None
        if split is None:
            return self._run(op, h, j, relus), None
        z, bn = split
        if bn.lean_applies(z) and bn.momentum is not None and prefers_channels_last(z):
            return z, bn
        return bn(z), None

    def _partial_node(self, states: list[torch.Tensor], offset: int, node_weights: torch.Tensor,
                      beta: torch.Tensor, relus: dict[int, torch.Tensor]) -> torch.Tensor:
        width = states[0].shape[1] // self.partial_channels
        outputs, bypasses = [], []
        for j, h in enumerate(states):
            outputs += [self._run(op, h[:, :width], j, relus) for op in self.edges[offset + j]]
            rest = h[:, width:]
            bypasses.append(self.bypass_pool(rest) if self.strides[offset + j] == 2 else rest)
        main = ops.mixed_sum(outputs, (node_weights * beta[:, None]).reshape(-1))
        rest = ops.mixed_sum(bypasses, beta)
        return channel_shuffle(torch.cat([main, rest], dim=1), self.partial_channels)
