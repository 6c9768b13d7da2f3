"""The candidates of every edge leaving one state of a search cell, run as a few batched calls.

Every edge leaving a state h applies the same candidate ops to h, each edge with weights of its own.
:class:`StateCandidates` holds those weights stacked, one tensor per layer kind, and runs them together:

* pooling and the affine-free batch norm after it once: in training mode they give every edge the same output (and
  the same running statistics, kept in one copy); a max and an average pool as one call
  (:func:`fastnas.ops.pool_pair`) and one norm over both;
* every batch norm's count of batches seen, equal for all of them (each runs once per forward), as one counter
  moved once per forward;
* the separable and dilated convolutions of all edges: one stack of depthwise convolutions (every kernel
  configuration of every edge, reading the state through their ReLU: :func:`fastnas.ops.depthwise_stack`), one
  grouped 1×1 convolution and one batch norm over the stacked channels (per-channel statistics: exact), then the
  second halves of the separable convolutions the same way;
* the factorized reductions of stride-2 edges (``skip_connect``'s and the gates') as one pair of 1×1 convolutions;
* the channel gates' MLPs as two grouped 1×1 convolutions, the spatial gates' convolutions as one convolution, and at
  stride 1 every gate scaling the state in one call (:func:`fastnas.ops.scale_stack`).

:meth:`StateCandidates.forward` returns the stacked outputs themselves (:attr:`StateCandidates.terms` says which
candidate each unit is), which :func:`fastnas.ops.edge_sums` weighs into the edges' node sums without a view per
edge. Ops it does not know run per edge, as they are. The per-edge names of the stacked tensors are kept
(:attr:`StateCandidates.sources`), so that the cell's state dict keeps the per-edge names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.defs.batch_norm import update_factor
from .attention import ChannelAttention, SpatialAttention
from .lean import LeanBatchNorm2d
from .operations import DilConv, FactorizedReduce, Gated, SepConv
from .pooling import AvgPool2d, MaxPool2d


@dataclass(frozen=True)
class Source:
    """Where the per-edge tensors ``names`` are in a stacked one: unit u is ``stored.view(shape).select(dim, u)``,
    reshaped to ``edge_shape``, and stands for the ``repeat`` names from ``u * repeat`` on (equal by construction);
    ``shared``: every name is the stored tensor itself."""

    names: tuple[str, ...]
    shape: tuple[int, ...] = ()
    dim: int = 0
    edge_shape: tuple[int, ...] = ()
    shared: bool = False
    repeat: int = 1

    def unstack(self, stored: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.shared:
            return {name: stored for name in self.names}
        view = stored.view(self.shape)
        return {name: view.select(self.dim, i // self.repeat).reshape(self.edge_shape)
                for i, name in enumerate(self.names)}

    def stack(self, tensors: Sequence[torch.Tensor], stored_shape: torch.Size) -> torch.Tensor:
        """The stored tensor from the per-edge ones (of each run of ``repeat``, the first)."""
        if self.shared:
            return tensors[0]
        unit = self.shape[:self.dim] + self.shape[self.dim + 1:]
        return torch.stack([t.reshape(unit) for t in tensors[::self.repeat]], self.dim).reshape(stored_shape)


def _kind(op: nn.Module) -> str | None:
    """What :class:`StateCandidates` runs ``op`` as, or None (run per edge)."""
    if isinstance(op, nn.Identity):
        return "skip"
    if isinstance(op, nn.Sequential) and len(op) == 2 and isinstance(op[0], (MaxPool2d, AvgPool2d)) \
            and isinstance(op[1], LeanBatchNorm2d) and not op[1].affine:
        return "pool"
    if isinstance(op, (SepConv, DilConv)):
        return "conv"
    if isinstance(op, FactorizedReduce):
        return "reduce"
    gate = op[1] if isinstance(op, Gated) and isinstance(op[0], FactorizedReduce) else op
    if isinstance(gate, ChannelAttention):
        return "channel_gate"
    if isinstance(gate, SpatialAttention) and not gate.bn.affine:
        return "spatial_gate"
    return None


def _tensor(module: nn.Module, key: str) -> torch.Tensor:
    """The parameter or buffer ``key`` (a dotted path) of ``module``."""
    path, _, name = key.rpartition(".")
    return getattr(module.get_submodule(path), name)


def _dw_config(conv: nn.Conv2d) -> tuple:
    return conv.kernel_size, conv.stride, conv.padding, conv.dilation


def _conv(x: torch.Tensor, weight: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
          groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` without bias; a frozen weight keeps only itself for the backward, a depthwise one runs on the
    backend's depthwise kernels (as :class:`fastnas.nn.lean.LeanConv2d` does)."""
    if groups == x.shape[1] == weight.shape[0] and groups > 1:
        return ops.depthwise_conv2d(x, weight, stride, padding, dilation)
    if not weight.requires_grad:
        return ops.frozen_conv2d(x, weight, stride, padding, dilation, groups)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


class StateCandidates(nn.Module):
    """The candidates of the ``edges`` (each a list of (column, op), all the same ops at the same stride) that leave
    one state. ``names[e]`` is edge e's prefix in the cell's state dict (``edges.{index}.``)."""

    def __init__(self, edges: Sequence[Sequence[tuple[int, nn.Module]]], names: Sequence[str]) -> None:
        super().__init__()
        self.sources: dict[str, Source] = {}
        self.n = n = len(edges)
        ops0 = [op for _, op in edges[0]]
        kinds = [_kind(op) for op in ops0]
        self.unbatched = [k for k, kind in enumerate(kinds) if kind is None]
        self.norm_settings: dict[str, tuple[float | None, float]] = {}  # per stacked norm: (momentum, eps)
        self._counted: list[tuple[str, torch.Tensor]] = []  # every norm's per-edge num_batches_tracked

        def per_edge(k: int) -> list[tuple[str, nn.Module]]:
            return [(f"{names[e]}{k}.", edges[e][k][1]) for e in range(n)]

        # pooling: once for all edges, a max and an average pool of one configuration as one pool_pair, with one
        # norm over both (the statistics are the same for every edge: one copy)
        pool_cols = [k for k, kind in enumerate(kinds) if kind == "pool"]
        self.pool_pair = _pair_config(*(ops0[k][0] for k in pool_cols)) if len(pool_cols) == 2 else None
        if self.pool_pair is not None:
            self._norm("pools", per_edge(pool_cols[0]) + per_edge(pool_cols[1]), "1", repeat=n)
        self.pools = nn.ModuleList()
        for k in pool_cols if self.pool_pair is None else ():
            self._norm(f"pool{len(self.pools)}", per_edge(k), "1", repeat=n)
            self.pools.append(ops0[k][0])
        self.skip = [k for k, kind in enumerate(kinds) if kind == "skip"]

        # separable and dilated convolutions: stage-1 units (sep convs' first halves, then dilated convs), grouped
        # by depthwise configuration; stage-2 units (sep convs' second halves)
        conv_cols = [k for k, kind in enumerate(kinds) if kind == "conv"]
        sep = [k for k in conv_cols if isinstance(ops0[k], SepConv)]
        dil = [k for k in conv_cols if not isinstance(ops0[k], SepConv)]
        first = lambda op: op[0] if isinstance(op, SepConv) else op  # noqa: E731
        self.stage1 = self._conv_stage("stage1", [(k, [(p + ("0." if k in sep else ""), first(op))
                                                       for p, op in per_edge(k)]) for k in sep + dil])
        self.stage2 = self._conv_stage("stage2", [(k, [(p + "1.", op[1]) for p, op in per_edge(k)]) for k in sep])
        self.sep_units, self.dil_units = len(sep) * n, len(dil) * n

        # factorized reductions (stride 2): skip_connect's, then the channel gates', then the spatial gates'
        reduce_cols = [k for k, kind in enumerate(kinds) if kind == "reduce"]
        gated_cols = [k for k, kind in enumerate(kinds) if kind in ("channel_gate", "spatial_gate")
                      and isinstance(ops0[k], Gated)]
        units = [(f"{p}", op) for k in reduce_cols for p, op in per_edge(k)]
        units += [(f"{p}0.", op[0]) for k in gated_cols for p, op in per_edge(k)]
        self.reduce_units = len(units)
        if units:
            C = units[0][1].bn.num_features
            self._stack("reduce1", units, "conv_1.weight")
            self._stack("reduce2", units, "conv_2.weight")
            self._norm("reduce", units, "bn", split=(2, C // 2))
        self.reduced_units = len(reduce_cols) * n  # skip_connect's, done; the gates' go on to their gates
        reduced = {k: g for g, k in enumerate(gated_cols)}

        # attention gates (after their reductions at stride 2)
        self.channel_gates, self.spatial_gates = [], []
        gate_cols = {"channel_gate": [], "spatial_gate": []}
        for k, kind in enumerate(kinds):
            if kind not in ("channel_gate", "spatial_gate"):
                continue
            gates = [(p + ("1." if k in reduced else ""), op[1] if k in reduced else op) for p, op in per_edge(k)]
            g = len(self.channel_gates if kind == "channel_gate" else self.spatial_gates)
            name = f"{kind}{g}"
            if kind == "channel_gate":  # the MLPs' weights as grouped 1×1 convolution weights (and biases)
                hid, width = gates[0][1].mlp[0].weight.shape
                self._stack(f"{name}_w1", gates, "mlp.0.weight", view=(hid, width, 1, 1))
                self._stack(f"{name}_b1", gates, "mlp.0.bias")
                self._stack(f"{name}_w2", gates, "mlp.2.weight", view=(width, hid, 1, 1))
                self._stack(f"{name}_b2", gates, "mlp.2.bias")
                self.channel_gates.append((name, reduced.get(k)))
            else:
                self._stack(f"{name}_conv", gates, "conv.weight")
                self._norm(name, gates, "bn")
                self.spatial_gates.append((name, reduced.get(k), gates[0][1].conv.padding))
            gate_cols[kind].append(k)
        if self._counted:
            first = self._counted[0][1]
            self._register("tracked", first.clone(), first, Source(tuple(n for n, _ in self._counted), shared=True))
        del self._counted
        # the terms forward returns, in its order: (per edge, the candidate column of each of its units' columns)
        self.terms: list[tuple[int, tuple[int, ...]]] = [(0, (k,)) for k in self.skip]
        self.terms += [(0, tuple(pool_cols))] if self.pool_pair is not None else [(0, (k,)) for k in pool_cols]
        self.terms += [(1, tuple(cols)) for cols in (dil, sep, reduce_cols) if cols]
        self.terms += [(1, (k,)) for kind in ("channel_gate", "spatial_gate") for k in gate_cols[kind]]
        # the ops run per edge keep their modules (and names) where they are: in the cell's edges

    # -- construction -----------------------------------------------------------------------------------------------
    def _register(self, name: str, tensor: torch.Tensor, like: torch.Tensor, source: Source) -> None:
        if isinstance(like, nn.Parameter):
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=like.requires_grad))
        else:
            self.register_buffer(name, tensor)
        self.sources[name] = source

    def _stack(self, name: str, units: Sequence[tuple[str, nn.Module]], key: str, dim: int = 0,
               merge: bool = True, view: tuple[int, ...] | None = None) -> None:
        """Register the tensors ``key`` of the ``units`` (each seen as ``view`` if given) stacked along ``dim``, the
        units merged with the dimensions before and after them unless not ``merge``."""
        tensors = [_tensor(m, key) for _, m in units]
        stacked = torch.stack([t.detach().view(view or t.shape) for t in tensors], dim)
        stored = stacked.flatten(0, dim + 1) if merge else stacked
        source = Source(tuple(p + key for p, _ in units), tuple(stacked.shape), dim, tuple(tensors[0].shape))
        self._register(name, stored.clone(), tensors[0], source)

    def _norm(self, name: str, units: Sequence[tuple[str, nn.Module]], key: str,
              split: tuple[int, int] | None = None, repeat: int = 1) -> None:
        """The running statistics of the units' batch norms ``key``, stacked (per unit [C], or, with ``split``
        (halves, C/2), as [halves, units, C/2]: the order in which the factorized reductions' halves are stacked);
        with ``repeat``, each run of ``repeat`` units keeps one copy (the pooling candidates' norms of all edges:
        equal by construction)."""
        for stat in ("mean", "var"):
            self._stack(f"{name}_{stat}", units[::repeat], f"{key}.running_{stat}", 1 if split else 0, view=split)
            if repeat > 1:
                one = self.sources[f"{name}_{stat}"]
                self.sources[f"{name}_{stat}"] = Source(tuple(f"{p}{key}.running_{stat}" for p, _ in units),
                                                        one.shape, one.dim, one.edge_shape, repeat=repeat)
        bn = units[0][1].get_submodule(key)
        self.norm_settings[name] = (bn.momentum, bn.eps)
        self._counted += [(f"{p}{key}.num_batches_tracked", m.get_submodule(key).num_batches_tracked)
                          for p, m in units]

    def _norm_of(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The affine-free batch norms ``name`` of stacked units: per-channel statistics over the stacked channels
        (the counter of batches seen is moved once per forward, by :meth:`forward`)."""
        mean, var = getattr(self, f"{name}_mean"), getattr(self, f"{name}_var")
        momentum, eps = self.norm_settings[name]
        if not self.training:
            return F.batch_norm(x, mean, var, None, None, False, 0.0, eps)
        return ops.batch_norm(x, mean, var, None, None, update_factor(momentum, self.tracked), eps)

    def _conv_stage(self, name: str, columns: list[tuple[int, list[tuple[str, DilConv]]]]) -> list[tuple]:
        """The depthwise convolutions of a stage, one per column: (parameter name, units, configuration); the pointwise
        convolutions and batch norms of all its units stacked in the same order (column by column, edge by edge)."""
        plan = []
        for g, (_, units) in enumerate(columns):
            self._stack(f"{name}_dw{g}", units, "1.weight")
            plan.append((f"{name}_dw{g}", len(units), _dw_config(units[0][1][1])))
        order = [unit for _, units in columns for unit in units]
        if order:
            self._stack(f"{name}_pw", order, "2.weight")
            self._norm(name, order, "3")
        return plan

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """The stacked candidate outputs of all the edges, as :attr:`terms` describes them (for
        :func:`fastnas.ops.edge_sums`): the state for skip_connect, the pooled outputs (shared by every edge), then
        the dilated convolutions, the separable convolutions, the factorized reductions and the gates, each one unit
        per edge per candidate. The dilated convolutions and the reductions are channel slices of wider outputs."""
        n, C = self.n, h.shape[1]
        terms = [h for _ in self.skip]
        if self.training and "tracked" in self._buffers:
            self.tracked.add_(1)
        if self.pool_pair is not None:
            terms.append(self._norm_of("pools", ops.pool_pair(h, *self.pool_pair)))
        else:
            terms += [self._norm_of(f"pool{g}", pool(h)) for g, pool in enumerate(self.pools)]
        if self.stage1:
            y1 = self._stage("stage1", h)
            # the separable convolutions' first halves go on to stage 2 (read in place), the dilated ones are done
            if self.stage2 and self.dil_units:
                y1_sep, y1_dil = y1.split([self.sep_units * C, self.dil_units * C], 1)
                terms += [y1_dil, self._stage("stage2", y1_sep)]
            else:
                terms.append(self._stage("stage2", y1) if self.stage2 else y1)
        gate_inputs = ()
        if self.reduce_units:  # [skip_connect's units | per gate column: n units], each [N, ·, H/2, W/2]
            gated = (self.reduce_units - self.reduced_units) // n
            parts = self._reduce(torch.relu(h), _layout(h)).split([self.reduced_units * C] + [n * C] * gated, 1)
            terms += [parts[0]] if self.reduced_units else []
            gate_inputs = parts[1:]
        for name, at, *_ in self.channel_gates:
            terms.append(self._channel_gate(name, h if at is None else gate_inputs[at], at is None))
        for name, at, padding in self.spatial_gates:
            terms.append(self._spatial_gate(name, h if at is None else gate_inputs[at], at is None, padding))
        return terms

    def _stage(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        """ReLU and depthwise convolutions (one stack: every column's units in one call, the ReLU applied as x is
        read), grouped pointwise and batch norm of a stage's units. In stage 1 every unit reads the state x; in
        stage 2 each unit reads its own stage-1 output (x holds them in the same order)."""
        groups = getattr(self, stage)
        y = ops.depthwise_stack(x, [getattr(self, name) for name, _, _ in groups],
                                *zip(*(config[1:] for _, _, config in groups)), relu=True)
        y = _conv(y, getattr(self, f"{stage}_pw"), groups=sum(units for _, units, _ in groups))
        return self._norm_of(stage, y)

    def _reduce(self, relu: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        """The factorized reductions of all reduce units: [N, units·C, H/2, W/2], unit by unit."""
        h_odd, w_odd = relu.shape[-2] % 2, relu.shape[-1] % 2
        shifted = relu[:, :, 1:, 1:]
        if h_odd or w_odd:
            shifted = F.pad(shifted, (0, w_odd, 0, h_odd))
        halves = torch.cat([_conv(relu, self.reduce1, (2, 2)), _conv(shifted, self.reduce2, (2, 2))], 1)
        y = self._norm_of("reduce", halves)  # channels [half, unit, C/2] → [unit, half, C/2]
        N, _, H, W = y.shape
        if fmt == torch.channels_last:
            y = y.permute(0, 2, 3, 1).unflatten(3, (2, self.reduce_units, -1)).transpose(3, 4)
            return y.reshape(N, H, W, -1).permute(0, 3, 1, 2)
        return y.unflatten(1, (2, self.reduce_units, -1)).transpose(1, 2).reshape(N, -1, H, W)

    def _channel_gate(self, name: str, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Each unit's channel gate applied to x (``shared``: the state, the same input for every unit; else the
        units' own inputs [N, units·C, H, W]): [N, units·C, H, W]."""
        w1, b1, w2, b2 = (getattr(self, f"{name}_{a}") for a in ("w1", "b1", "w2", "b2"))
        units, N = w1.shape[0] // w2.shape[1], x.shape[0]
        # the MLPs of all units as two grouped 1×1 convolutions of the avg- and max-pooled rows [2N, ·, 1, 1]
        rows = torch.cat(ops.channel_pool(x), 0)  # [2N, C] (shared) or [2N, units·C]
        hidden = torch.relu(F.conv2d(rows.view(2 * N, -1, 1, 1), w1, b1, groups=1 if shared else units))
        logits = F.conv2d(hidden, w2, b2, groups=units).view(2, N, -1).sum(0)  # [N, units·C]: avg + max paths
        # each unit scales its own channels, or every unit the shared state: one fused op either way
        return (ops.scale_stack if shared else ops.channel_scale)(x, logits)

    def _spatial_gate(self, name: str, x: torch.Tensor, shared: bool, padding) -> torch.Tensor:
        """Each unit's spatial gate applied to x (as :meth:`_channel_gate`): [N, units·C, H, W]."""
        weight = getattr(self, f"{name}_conv")
        units = weight.shape[0]
        if shared:  # every unit scales the state: one fused op
            logits = _conv(ops.spatial_pool(x), weight, padding=padding)
            return ops.scale_stack(x, self._norm_of(name, logits))
        x5 = x.unflatten(1, (units, -1))
        pooled = torch.stack([x5.amax(2), x5.mean(2)], 2).flatten(1, 2)  # [N, units·2, H, W]
        logits = _conv(pooled, weight, padding=padding, groups=units)
        gate = torch.sigmoid(self._norm_of(name, logits))
        return (x5 * gate.unsqueeze(2)).flatten(1, 2)


def _pair_config(first: nn.Module, second: nn.Module) -> tuple | None:
    """(kernel size, stride, padding) when ``first`` and ``second`` are a max and an average pool that
    :func:`fastnas.ops.pool_pair` computes together (one configuration, its pooling arithmetic), else None."""
    if not (type(first) is MaxPool2d and type(second) is AvgPool2d and first.fused and second.fused):
        return None
    config = [(m.kernel_size, m.stride, m.padding) for m in (first, second)]
    return config[0] if config[0] == config[1] else None


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if ops.prefers_channels_last(x) else torch.contiguous_format
