"""mixed_sum: out = Σ_k w[k]·xs[k] (the DARTS MixedOp), forward and backward, as flat elementwise Triton kernels.

All K inputs share one dense layout (they are copied into the layout of ``xs[0]`` where they do not), so the kernels
walk memory linearly: program ``i`` owns elements ``[i·BLOCK, (i+1)·BLOCK)`` of every tensor. The inputs are separate
pointer arguments (up to ``MAX_K`` = 8 per launch; larger K is cut into chunks), so Triton sees each one's 16-byte
alignment and vectorises every load.

Forward: one read of each input, one write of the output, fp32 (fp64) accumulation.
Backward: one read of the upstream gradient ``g``; per k, the write ``grad xs[k] = w[k]·g`` and, when the weights
need a gradient, the read of ``xs[k]`` for the program's partial sum Σ g·xs[k] over its block. The partials
``[programs, K]`` are then summed in a fixed order by :func:`kernels._common.sum_partials` — no float atomics, so the
weight gradient is bitwise reproducible.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_is_fp64, interpreted, launch, next_pow2, sm_count, sum_partials, tuning

MAX_K = 8


@triton.jit
def _mixed_sum_fwd_kernel(
    OUT, ACC_IN, W, X0, X1, X2, X3, X4, X5, X6, X7,
    n_elements,
    w_offset,
    K: tl.constexpr,
    HAS_ACC_IN: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    if HAS_ACC_IN:
        acc = tl.load(ACC_IN + offs, mask=mask, other=0.0).to(acc_ty)
    else:
        acc = tl.zeros((BLOCK,), acc_ty)
    acc += tl.load(W + w_offset).to(acc_ty) * tl.load(X0 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 1:
        acc += tl.load(W + w_offset + 1).to(acc_ty) * tl.load(X1 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 2:
        acc += tl.load(W + w_offset + 2).to(acc_ty) * tl.load(X2 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 3:
        acc += tl.load(W + w_offset + 3).to(acc_ty) * tl.load(X3 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 4:
        acc += tl.load(W + w_offset + 4).to(acc_ty) * tl.load(X4 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 5:
        acc += tl.load(W + w_offset + 5).to(acc_ty) * tl.load(X5 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 6:
        acc += tl.load(W + w_offset + 6).to(acc_ty) * tl.load(X6 + offs, mask=mask, other=0.0).to(acc_ty)
    if K > 7:
        acc += tl.load(W + w_offset + 7).to(acc_ty) * tl.load(X7 + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_term(G_acc, GX, X, W, PART, k, offs, mask, part_row,
              NEED_X: tl.constexpr, NEED_W: tl.constexpr, acc_ty: tl.constexpr):
    if NEED_X:
        wk = tl.load(W + k).to(acc_ty)
        tl.store(GX + offs, (wk * G_acc).to(GX.dtype.element_ty), mask=mask)
    if NEED_W:
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(PART + part_row + k, tl.sum(G_acc * x, axis=0))


@triton.jit
def _mixed_sum_bwd_kernel(
    G, W, PART,
    GX0, GX1, GX2, GX3, GX4, GX5, GX6, GX7,
    X0, X1, X2, X3, X4, X5, X6, X7,
    n_elements,
    w_offset,  # first weight index of this chunk: weights and partial columns are indexed w_offset + k
    part_stride,  # row stride of PART (the total K)
    K: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_W: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(acc_ty)
    row = pid * part_stride
    Wk = W + w_offset
    Pk = PART + w_offset
    _bwd_term(g, GX0, X0, Wk, Pk, 0, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 1:
        _bwd_term(g, GX1, X1, Wk, Pk, 1, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 2:
        _bwd_term(g, GX2, X2, Wk, Pk, 2, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 3:
        _bwd_term(g, GX3, X3, Wk, Pk, 3, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 4:
        _bwd_term(g, GX4, X4, Wk, Pk, 4, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 5:
        _bwd_term(g, GX5, X5, Wk, Pk, 5, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 6:
        _bwd_term(g, GX6, X6, Wk, Pk, 6, offs, mask, row, NEED_X, NEED_W, acc_ty)
    if K > 7:
        _bwd_term(g, GX7, X7, Wk, Pk, 7, offs, mask, row, NEED_X, NEED_W, acc_ty)


# ---------------------------------------------------------------------------------------------------------------------
# launch-size choice


def block_config(n_elements: int, elem_bytes: int, device: torch.device | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for the flat kernels.

    GPU: at most 16 KiB of each input per program (4096 fp32 / 8192 half / 2048 fp64 elements), halved down to
    1024 elements until there are at least four programs per SM; 4 warps up to 2048 elements, 8 above, so every
    thread holds whole 16-byte vectors of each of the K inputs (K·2 or more loads in flight per thread). At the
    DARTS search shape (1 Mi fp32 elements) that is BLOCK 1024, 1024 programs. Under the interpreter one program
    covers up to 64 Ki elements.
    """
    if interpreted():
        return min(next_pow2(max(n_elements, 1)), 1 << 16), 1
    tile_bytes, per_sm = tuning()
    block = max(2 * tile_bytes // max(elem_bytes, 1), 1024)
    target = per_sm * (sm_count(device) if device is not None else 132)
    while block > 1024 and triton.cdiv(n_elements, block) < target:
        block //= 2
    block = min(block, max(next_pow2(n_elements), 128))
    return block, 8 if block > 2048 else 4


# ---------------------------------------------------------------------------------------------------------------------
# launchers


def _same_layout(xs: Sequence[torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    """The inputs in the (dense) layout of ``like``: unchanged where they match, copied where they do not."""
    return [x if x.stride() == like.stride() else torch.empty_like(like).copy_(x) for x in xs]


def output_like(x0: torch.Tensor) -> torch.Tensor:
    """The output of mixed_sum (``empty_like(xs[0])``) or an input gradient (``empty_like(grad)``), as
    :mod:`fastnas.ops.layout` says; dense in every case."""
    return torch.empty_like(x0)


def mixed_sum_forward(xs: Sequence[torch.Tensor], weights: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Σ_k weights[k]·xs[k] in the layout of ``empty_like(xs[0])``."""
    out = output_like(xs[0])
    n = out.numel()
    if n == 0:
        return out
    xs = _same_layout(xs, out)
    weights = weights.contiguous()
    k_total = len(xs)
    acc64 = acc_is_fp64(out.dtype)
    cfg_block, num_warps = block_config(n, out.element_size(), out.device)
    block = block or cfg_block
    grid = (triton.cdiv(n, block),)
    chunks = [(k0, min(k0 + MAX_K, k_total)) for k0 in range(0, k_total, MAX_K)]
    acc_in = None
    for i, (k0, k1) in enumerate(chunks):
        last = i == len(chunks) - 1
        # partial sums of a multi-chunk K stay in the accumulation dtype between launches
        dst = out if last else torch.empty(out.shape, dtype=acc_dtype(out.dtype), device=out.device)
        ptrs = list(xs[k0:k1]) + [xs[k0]] * (MAX_K - (k1 - k0))
        launch(_mixed_sum_fwd_kernel, grid,
            dst, acc_in if acc_in is not None else dst, weights, *ptrs, n, k0,
            K=k1 - k0, HAS_ACC_IN=acc_in is not None, ACC64=acc64, BLOCK=block, num_warps=num_warps,
        )
        acc_in = dst
    return out


def mixed_sum_backward(
    grad: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    need_xs: bool,
    need_w: bool,
    block: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(grad xs, grad weights); the gradients of the inputs in the layout of ``empty_like(grad)``. ``xs`` may be
    empty when ``need_w`` is false."""
    k_total = weights.shape[0]
    like = grad
    gxs = [output_like(grad) for _ in range(k_total)] if need_xs else []
    n = like.numel()
    gw = None
    if need_w:
        gw = (torch.empty if n else torch.zeros)(weights.shape, dtype=weights.dtype, device=weights.device)
    if n == 0 or not (need_xs or need_w):
        return gxs, gw
    ref = gxs[0] if need_xs else output_like(like)
    grad = _same_layout([grad], ref)[0]
    if need_w:
        xs = _same_layout(xs, ref)
    weights = weights.contiguous()
    acc64 = acc_is_fp64(grad.dtype)
    cfg_block, num_warps = block_config(n, grad.element_size(), grad.device)
    block = block or cfg_block
    programs = triton.cdiv(n, block)
    part = torch.empty((programs, k_total), dtype=acc_dtype(grad.dtype), device=grad.device) if need_w else grad
    for k0 in range(0, k_total, MAX_K):
        k1 = min(k0 + MAX_K, k_total)
        gptrs = (gxs[k0:k1] if need_xs else [grad] * (k1 - k0)) + [grad] * (MAX_K - (k1 - k0))
        xptrs = (list(xs[k0:k1]) if need_w else [grad] * (k1 - k0)) + [grad] * (MAX_K - (k1 - k0))
        launch(_mixed_sum_bwd_kernel, (programs,),
            grad, weights, part, *gptrs, *xptrs, n, k0, k_total,
            K=k1 - k0, NEED_X=need_xs, NEED_W=need_w, ACC64=acc64, BLOCK=block, num_warps=num_warps,
        )
    if need_w:
        sum_partials(part, gw)
    return gxs, gw
