"""Collapse indicators, recorded per epoch in ``alphas.json`` and the log, and drawn in ``collapse.png``.

- the number of parameter-free operations (skip connections, pooling) and of attention gates in each derived cell;
  the attention gates are gated identities, so they may collapse as skip connections do;
- the entropy of each cell type's softmax weights (the mean over its edges of −Σ p log p; log(ops) when uniform);
- the dominant eigenvalue of the Hessian of the validation loss with respect to α (both cell types), which
  RobustDARTS (Zela et al., 2020) found to grow before the derived cells degrade: power iteration on exact
  Hessian-vector products (double backward), every ``--hessian-every`` epochs on one validation batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .architect import frozen
from .genotype import Genotype


def is_parameter_free_op(name: str) -> bool:
    """Skip connections and pooling (``none`` is never derived)."""
    return name == "skip_connect" or "pool" in name or name == "none"


def is_attention_op(name: str) -> bool:
    return "attention" in name


def cell_counts(genotype: Genotype) -> dict[str, dict[str, int]]:
    """Per derived cell type: how many of its edges are parameter-free, and how many are attention gates."""
    return {kind: {"parameter_free": sum(is_parameter_free_op(op) for op, _ in getattr(genotype, kind)),
                   "attention": sum(is_attention_op(op) for op, _ in getattr(genotype, kind))}
            for kind in ("normal", "reduce")}


def alpha_entropy(weights: torch.Tensor) -> float:
    """Mean over the edges (rows) of the entropy of softmax ``weights`` [edges, ops], in nats."""
    p = weights.detach().double()
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1).mean())


def dominant_eigenvalue(gradient: Callable[[], Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                        iterations: int = 20, tol: float = 1e-3, generator: torch.Generator | None = None) -> float:
    """The eigenvalue of largest magnitude of the Hessian H of a loss w.r.t. ``params``, by power iteration.

    ``gradient()`` returns the loss's gradient w.r.t. ``params`` with ``create_graph=True``; each iteration takes
    one Hessian-vector product Hv = ∇(g·v) from it. Stops after ``iterations`` or when the Rayleigh quotient v·Hv
    changes by less than ``tol`` relative to itself."""
    grads = list(gradient())
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in params]
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in v))
    v = [x / norm for x in v]
    eigenvalue = None
    for i in range(iterations):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=i < iterations - 1, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]
        value = float(sum((a.double() * b.double()).sum() for a, b in zip(v, hv)))
        norm = torch.sqrt(sum((h.double() ** 2).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h / norm.to(h.dtype) for h in hv]
        if eigenvalue is not None and abs(value - eigenvalue) <= tol * abs(value):
            return value
        eigenvalue = value
    return eigenvalue


def hessian_eigenvalue(model, forward: Callable, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
                       iterations: int = 20, tol: float = 1e-3, seed: int = 0) -> float:
    """The dominant eigenvalue of ∇²_α L_val(w, α) on the batch (x, y) for a :class:`fastnas.SuperNet`: α of both
    cell types, the weights frozen; the batch-norm statistics are put back as they were, and the start vector comes
    from a generator of its own (``seed``), so the search's random stream is not touched."""
    alphas = [model.alphas_normal, model.alphas_reduce]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    generator = torch.Generator().manual_seed(seed)
    try:
        with frozen(model.weight_parameters()):
            def gradient():
                loss = criterion(forward(x), y)
                return torch.autograd.grad(loss, alphas, create_graph=True)
            return dominant_eigenvalue(gradient, alphas, iterations, tol, generator)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])


def epoch_indicators(genotype: Genotype, weights: tuple[torch.Tensor, torch.Tensor],
                     hessian: float | None = None) -> dict:
    """The indicators of one epoch, as ``alphas.json`` stores them."""
    counts = cell_counts(genotype)
    return {
        "parameter_free": {k: counts[k]["parameter_free"] for k in counts},
        "attention": {k: counts[k]["attention"] for k in counts},
        "entropy": {"normal": alpha_entropy(weights[0]), "reduce": alpha_entropy(weights[1])},
        "hessian_eigenvalue": hessian,
    }


def describe(ind: dict) -> str:
    """One log line."""
    pf, at, en = ind["parameter_free"], ind["attention"], ind["entropy"]
    text = (f"parameter-free ops normal {pf['normal']} reduce {pf['reduce']} | attention normal {at['normal']} "
            f"reduce {at['reduce']} | alpha entropy normal {en['normal']:.4f} reduce {en['reduce']:.4f}")
    if ind.get("hessian_eigenvalue") is not None:
        text += f" | Hessian eigenvalue {ind['hessian_eigenvalue']:.4g}"
    return text
