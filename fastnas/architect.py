"""The architecture step of DARTS's bilevel optimisation, first and second order.

First order: α ← α − ξ_α ∇α L_val(w, α).
Second order (DARTS eq. 7): one virtual SGD step w′ = w − η (m + ∇w L_train(w, α) + λw) (m: the weight optimiser's
momentum), then ∇α L_val(w′, α) − η ∇²α,w L_train(w, α) ∇w′ L_val(w′, α), the Hessian-vector product taken by
finite differences, (∇α L_train(w⁺, α) − ∇α L_train(w⁻, α)) / (2ε), w± = w ± ε ∇w′ L_val, ε = 0.01 / ‖∇w′ L_val‖.
The virtual step runs through ``torch.func.functional_call``: no module is cloned, and the network's own weights
and batch-norm statistics are left untouched.

Regularisers of α alone (``terms``, e.g. β-DARTS's Beta-Decay, :mod:`fastnas.robust`) add their gradients to the
architecture gradient of either order. A ``penalty`` (the budget of :mod:`fastnas.budget`, which may multiply the
loss) maps the validation loss to the architecture objective: in second order it is applied to L_val(w′, α), so
both ∇α and the ∇w′ of the Hessian-vector product are those of the penalised objective.

Under torchrun both steps average their final gradients across ranks (:func:`fastnas.distributed.all_reduce_mean`)
before the optimiser steps, so every rank applies the same update. In second order, each rank's virtual step and
Hessian-vector product use its own batches (local ∇w L_train); the resulting architecture gradients are averaged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from . import distributed
from .supernet import SuperNet

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def frozen(params) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``params`` for the block (only those that had it)."""
    live = [p for p in params if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


def _grad(loss: torch.Tensor, inputs) -> list[torch.Tensor]:
    """d loss / d inputs, with zeros for inputs the loss does not use (e.g. alphas_normal without normal cells)."""
    inputs = list(inputs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


class Architect:
    def __init__(self, model: SuperNet, criterion: LossFn, lr: float = 3e-4, betas=(0.5, 0.999),
                 weight_decay: float = 1e-3, order: int = 1, network_momentum: float = 0.9,
                 network_weight_decay: float = 3e-4, forward: Callable | None = None,
                 scaler: torch.amp.GradScaler | None = None, fd_radius: float = 1e-2,
                 terms: Sequence[Callable[[SuperNet], list[torch.Tensor]]] = (),
                 penalty: Callable[[torch.Tensor, SuperNet], torch.Tensor] | None = None,
                 capturable: bool = False) -> None:
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.model, self.criterion, self.order = model, criterion, order
        self.network_momentum, self.network_weight_decay = network_momentum, network_weight_decay
        self.fd_radius = fd_radius  # ε·‖v‖ of the finite difference: 0.01 in DARTS
        self.forward = forward if forward is not None else model  # the (possibly compiled) model
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None  # fp16 loss scaling
        # regularisers of α alone (fastnas.robust): each gives its gradient, added to the loss's
        self.terms = list(terms)
        self.penalty = penalty  # the validation loss -> the architecture objective (fastnas.budget)
        # (capturable: a CUDA graph may record its step, fastnas.cudagraph)
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                          fused=True, capturable=capturable)
        self.weights = model.weight_parameters()  # frozen in each first-order step (listed once: a module walk)

    def step(self, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
             eta: float, network_optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One update of the architecture weights; returns the validation loss (detached)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.order == 1:
            loss, grads = self._first_order(x_valid, y_valid)
        else:
            loss, grads = self._second_order(x_train, y_train, x_valid, y_valid, eta, network_optimizer)
        distributed.all_reduce_mean(grads)  # no-op in a single process
        for term in self.terms:  # the same on every rank; scaled as the loss's gradient is under fp16
            scale = self.scaler.get_scale() if self.scaler is not None else 1.0
            grads = [g + scale * t.to(g.dtype) for g, t in zip(grads, term(self.model))]
        for a, g in zip(self.model.arch_parameters(), grads):
            a.grad = g
        if self.scaler is None:
            self.optimizer.step()
        else:  # unscales, skips the step on inf/nan, adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()

    # -- first order ------------------------------------------------------------------------------------------------
    def _first_order(self, x: torch.Tensor, y: torch.Tensor):
        # the weights frozen: no weight gradient is computed, and no activation is kept for one (a frozen
        # convolution keeps only its weight, see fastnas.nn.lean; a compiled region traces a graph without them)
        with frozen(self.weights):
            loss = self.criterion(self.forward(x), y)
            objective = self._objective(loss)
            scaled = self.scaler.scale(objective) if self.scaler is not None else objective
            return loss, _grad(scaled, self.model.arch_parameters())

    def _objective(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.penalty is None else self.penalty(loss, self.model)

    # -- second order -----------------------------------------------------------------------------------------------
    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **buffers}, (x,))

    def _second_order(self, x_train, y_train, x_valid, y_valid, eta: float, network_optimizer):
        model = self.model
        names, weights = zip(*model.named_weight_parameters())
        alphas = dict(model.named_arch_parameters())
        # private copies of the batch-norm statistics: the virtual steps must not move the real ones
        buffers = {n: b.clone() for n, b in model.named_buffers()}

        # virtual step w' = w - eta * (momentum + dL_train/dw + wd * w)
        loss_train = self.criterion(self._call({**dict(zip(names, weights)), **alphas}, buffers, x_train), y_train)
        dw = _grad(loss_train, weights)
        with torch.no_grad():
            unrolled = []
            for w, g in zip(weights, dw):
                step = g + self.network_weight_decay * w
                buf = network_optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    step = step + self.network_momentum * buf
                unrolled.append((w - eta * step).requires_grad_(True))

        # validation loss at w': gradient for alpha and for w'
        loss_valid = self.criterion(self._call({**dict(zip(names, unrolled)), **alphas}, buffers, x_valid), y_valid)
        grads = _grad(self._objective(loss_valid), list(alphas.values()) + unrolled)
        d_alpha, d_unrolled = grads[: len(alphas)], grads[len(alphas):]

        # finite-difference Hessian-vector product at w
        hvp = self._hessian_vector_product(names, weights, alphas, buffers, d_unrolled, x_train, y_train,
                                           self.fd_radius)
        return loss_valid, [da - eta * h for da, h in zip(d_alpha, hvp)]

    def _hessian_vector_product(self, names, weights, alphas, buffers, vector, x, y, r: float):
        # ε stays on the device (no step waits for it); a vanished vector (norm 0) shifts nothing whatever ε is, so
        # both gradients are equal and the product is exactly zero
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vector))
        eps = torch.where(norm > 0, r / norm, 1.0)
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                shifted = [w + sign * eps * v for w, v in zip(weights, vector)]
            loss = self.criterion(self._call({**dict(zip(names, shifted)), **alphas}, buffers, x), y)
            grads.append(_grad(loss, alphas.values()))
        return [(gp - gn) / (2 * eps) for gp, gn in zip(*grads)]


def weight_step(model: nn.Module, forward: Callable, criterion: LossFn, optimizer: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, grad_clip: float | None, arch_parameters=(),
                scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the network weights with the architecture frozen (no α gradient is built or kept).

    Returns (loss, logits), detached."""
    optimizer.zero_grad(set_to_none=True)
    with frozen(arch_parameters):
        logits = forward(x)
        loss = criterion(logits, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    # under torchrun: the mean gradient over ranks (before unscaling, so an inf on any rank skips the step on all)
    distributed.all_reduce_mean([p.grad for g in optimizer.param_groups for p in g["params"]])
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), logits.detach()
