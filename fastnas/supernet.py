"""The DARTS search supernet (one-shot model) over a search space of primitives."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .genotype import Genotype, derive
from .nn.plans import Execution, Plan, make_plan
from .nn.search_cell import SearchCell
from .space import DEFAULT_SPACE, resolve_primitives


def reduction_layers(layers: int) -> list[int]:
    """The cells that halve the resolution: at 1/3 and 2/3 of the depth, as in DARTS."""
    return sorted({layers // 3, 2 * layers // 3})


def check_input_size(height: int, width: int, layers: int) -> None:
    """Raise :class:`ConfigError` when the image is too small for the network's reductions."""
    n = len(reduction_layers(layers))
    need = 2 ** n
    if min(height, width) < need:
        raise ConfigError(f"input of {height}x{width} is too small for {n} reduction cells ({layers} layers): "
                          f"each reduction halves it, so it needs at least {need}x{need}")


class SuperNet(nn.Module):
    """The DARTS search network: stem, ``layers`` search cells (reductions at 1/3 and 2/3), classifier.

    ``plan`` executes the cells' node sums: built once, with the network, by :func:`fastnas.nn.plans.make_plan`
    from a name, a :class:`fastnas.nn.plans.Plan` or None (the best plan that runs in ``execution``: pass the
    device, layout, AMP and compile setting the network will run in, :class:`fastnas.nn.plans.Execution`);
    ``memory_efficient=False`` asks for the DARTS formulation, which stores every activation. The arithmetic is the
    same under every plan; ``plan.reason`` says why it was chosen.
    The architecture weights ``alphas_normal`` and ``alphas_reduce`` ([edges, ops], initialised 1e-3·randn) are
    parameters of the module, so they are saved and loaded with it; :meth:`arch_parameters` and
    :meth:`weight_parameters` keep them apart for the two optimisers. ``aux_skip`` gives the reduction cells the
    weights of DARTS-'s auxiliary skip on their stride-2 edges (used under :class:`fastnas.nn.plans.AuxSkipPlan`).
    """

    def __init__(self, C: int = 16, layers: int = 8, num_classes: int = 10,
                 primitives: str | Sequence[str] = DEFAULT_SPACE, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, in_channels: int = 3, partial_channels: int = 1,
                 memory_efficient: bool = True, plan: str | Plan | None = None, aux_skip: bool = False,
                 execution: Execution | None = None) -> None:
        super().__init__()
        if C < 1 or layers < 1 or num_classes < 1 or steps < 1:
            raise ConfigError(f"SuperNet needs C, layers, num_classes and steps >= 1, got {C}, {layers}, "
                              f"{num_classes}, {steps}")
        if not 1 <= multiplier <= steps:
            raise ConfigError(f"multiplier must be between 1 and steps ({steps}), got {multiplier}")
        if C % 2:
            raise ConfigError(f"C must be even (factorized reductions split channels in two), got {C}")
        self.primitives = resolve_primitives(primitives)
        self.C, self.layers, self.num_classes = C, layers, num_classes
        self.steps, self.multiplier, self.in_channels = steps, multiplier, in_channels
        self.partial_channels = partial_channels
        if partial_channels < 1 or C % partial_channels:
            raise ConfigError(f"partial_channels must be >= 1 and divide C={C}, got {partial_channels}")

        self.plan = make_plan(plan, execution, store_all=not memory_efficient, partial_channels=partial_channels,
                              aux_skip=aux_skip)

        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        reductions = reduction_layers(layers)
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(self.primitives, steps, multiplier, c_prev_prev, c_prev, c_curr,
                                         reduction, reduction_prev, partial_channels, self.plan, aux_skip))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

        n_edges = sum(2 + i for i in range(steps))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(self.primitives)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, len(self.primitives)))
        if partial_channels > 1:  # PC-DARTS edge normalisation
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))

    # -- parameters -------------------------------------------------------------------------------------------------
    def named_arch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        names = ["alphas_normal", "alphas_reduce"] + (["betas_normal", "betas_reduce"] if self.partial_channels > 1
                                                      else [])
        return [(n, getattr(self, n)) for n in names]

    def arch_parameters(self) -> list[nn.Parameter]:
        """α of both cell types (and the PC-DARTS edge weights β with partial channels)."""
        return [p for _, p in self.named_arch_parameters()]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        arch = {id(p) for p in self.arch_parameters()}
        return ((n, p) for n, p in self.named_parameters() if id(p) not in arch)

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def arch_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over ops of each edge: (normal, reduce), each [edges, ops]."""
        return F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)

    def edge_weights(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """PC-DARTS edge normalisation: softmax of β over the incoming edges of each node (normal, reduce)."""
        if self.partial_channels == 1:
            return None, None
        return self._node_softmax(self.betas_normal), self._node_softmax(self.betas_reduce)

    def _node_softmax(self, beta: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for i in range(self.steps):
            parts.append(F.softmax(beta[start:start + 2 + i], dim=-1))
            start += 2 + i
        return torch.cat(parts)

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"SuperNet expects input [N, {self.in_channels}, H, W], got {list(x.shape)}")
        check_input_size(x.shape[2], x.shape[3], self.layers)
        w_normal, w_reduce = self.arch_weights()
        e_normal, e_reduce = self.edge_weights()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, e_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, e_normal)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))

    # -- result -----------------------------------------------------------------------------------------------------
    def genotype(self) -> Genotype:
        w_normal, w_reduce = self.arch_weights()
        e_normal, e_reduce = self.edge_weights()
        return derive(w_normal, w_reduce, self.primitives, self.steps, self.multiplier, e_normal, e_reduce)

    def edge_names(self) -> list[str]:
        """Readable name of each edge row of the alphas: ``node0<-c_{k-2}`` ..."""
        names = []
        for i in range(self.steps):
            for j in range(2 + i):
                src = ("c_{k-2}", "c_{k-1}")[j] if j < 2 else f"node{j - 2}"
                names.append(f"node{i}<-{src}")
        return names
