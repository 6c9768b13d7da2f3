"""channel_pool and spatial_pool: mean and max (with its first index) along one axis, forward and backward.

Both ops are one kernel pair over the ``[N, P, R]`` view of x (see :mod:`kernels._common`): channel_pool reduces
R = H·W for every (n, c), spatial_pool reduces R = C for every (n, h·w).

Forward (``pool_fwd_kernel``): program (n, block of BP rows) walks R in ``[BP, BR]`` tiles and keeps, per lane of the
tile, a running sum and the running maximum with the index where it was first reached; at the end a tree reduction
over the BR lanes gives the row's sum, its maximum and the smallest index holding it. NaN counts as larger than any
number and the first NaN wins, as in ``torch.max(dim)``. Each row is reduced by one program in a fixed order, so the
result is deterministic. Outputs: mean, max (input dtype) and the argmax (int32), which the backward uses instead of
a second pass over x.

When N·P/BP programs alone would leave the GPU idle (channel_pool on channels_last: P = C is the contiguous axis, so
rows cannot be cut finely), R is also split over programs: each writes its partial sum, maximum and first index to
``[SPLIT, N·P]`` buffers, and ``pool_combine_kernel`` merges them in split order (the earlier split wins a tie).

Backward (``pool_bwd_kernel``): grad x[n, p, r] = g_mean[n, p] / R + (r == argmax[n, p]) · g_max[n, p]; a pure write
of x's size, one ``[BP, BR]`` tile per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INT32_MAX, TileConfig, acc_is_fp64, as_npr, interpreted, launch, next_pow2, npr_strides, tile_config,
)


@triton.jit
def _first_max_take(v, i, best, best_i):
    """Whether (v, i) replaces (best, best_i) as "the first maximum", given i > best_i unless best_i is unset:
    strictly larger, or NaN over a number (NaN is the largest), or an equal value where none was set yet."""
    return (v > best) | ((v != v) & (best == best)) | ((v == best) & (i < best_i))


@triton.jit
def pool_fwd_kernel(
    X, MEAN, MAX, IDX, PSUM, PMAX, PIDX,
    P, R, NPB, SPLIT, R_CHUNK,
    sx_n, sx_p, sx_r,
    smean_n, smean_p,
    smax_n, smax_p,
    sidx_n, sidx_p,
    FINISH: tl.constexpr,  # one split: write mean/max/argmax; else partials PSUM/PMAX/PIDX[split, n*P + p]
    ACC64: tl.constexpr,
    BP: tl.constexpr,
    BR: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pid = tl.program_id(0)
    split = pid % SPLIT
    rest = pid // SPLIT
    n = (rest // NPB).to(tl.int64)
    p = (rest % NPB) * BP + tl.arange(0, BP)
    pmask = p < P
    p64 = p.to(tl.int64)
    base = X + n * sx_n + p64[:, None] * sx_p
    total = tl.zeros((BP, BR), acc_ty)
    best = tl.full((BP, BR), float("-inf"), acc_ty)
    best_i = tl.full((BP, BR), INT32_MAX, tl.int32)
    r_start = split * R_CHUNK
    for r0 in range(r_start, r_start + R_CHUNK, BR):
        r = r0 + tl.arange(0, BR)
        mask = pmask[:, None] & (r < R)[None, :]
        v = tl.load(base + r[None, :].to(tl.int64) * sx_r, mask=mask, other=float("-inf")).to(acc_ty)
        total += tl.where(mask, v, 0.0)
        ri = tl.where(mask, r[None, :], INT32_MAX)
        take = _first_max_take(v, ri, best, best_i)
        best = tl.where(take, v, best)
        best_i = tl.where(take, ri, best_i)
    # across lanes: the row's maximum (NaN if any lane holds NaN) and the smallest index that holds it
    is_nan = best != best
    row_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    finite_best = tl.where(is_nan, float("-inf"), best)
    row_max = tl.max(finite_best, axis=1)
    holder = tl.where(row_nan[:, None], is_nan, (finite_best == row_max[:, None]) & (best_i < INT32_MAX))
    row_idx = tl.min(tl.where(holder, best_i, INT32_MAX), axis=1)
    row_max = tl.where(row_nan, float("nan"), row_max)
    row_sum = tl.sum(total, axis=1)
    if FINISH:
        tl.store(MEAN + n * smean_n + p64 * smean_p, (row_sum / R).to(MEAN.dtype.element_ty), mask=pmask)
        tl.store(MAX + n * smax_n + p64 * smax_p, row_max.to(MAX.dtype.element_ty), mask=pmask)
        tl.store(IDX + n * sidx_n + p64 * sidx_p, row_idx, mask=pmask)
    else:
        m = split.to(tl.int64) * (tl.num_programs(0) // SPLIT // NPB) * P + n * P + p64
        tl.store(PSUM + m, row_sum, mask=pmask)
        tl.store(PMAX + m, row_max, mask=pmask)
        tl.store(PIDX + m, row_idx, mask=pmask)


@triton.jit
def pool_combine_kernel(
    PSUM, PMAX, PIDX, MEAN, MAX, IDX,
    SPLIT, M, P, R,
    smean_n, smean_p,
    smax_n, smax_p,
    sidx_n, sidx_p,
    BM: tl.constexpr,
):
    """Merge the per-split partials of pool_fwd_kernel in split order (splits cover increasing R ranges)."""
    m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    mm = m < M
    total = tl.zeros((BM,), PSUM.dtype.element_ty)
    best = tl.full((BM,), float("-inf"), PMAX.dtype.element_ty)
    best_i = tl.full((BM,), INT32_MAX, tl.int32)
    m_total = tl.full((), 0, tl.int64) + M  # int64 (M may arrive as the constexpr 1)
    for s in range(0, SPLIT):
        off = s * m_total + m
        total += tl.load(PSUM + off, mask=mm, other=0.0)
        v = tl.load(PMAX + off, mask=mm, other=float("-inf"))
        i = tl.load(PIDX + off, mask=mm, other=INT32_MAX)
        take = _first_max_take(v, i, best, best_i)
        best = tl.where(take, v, best)
        best_i = tl.where(take, i, best_i)
    n = m // P
    p = m % P
    tl.store(MEAN + n * smean_n + p * smean_p, (total / R).to(MEAN.dtype.element_ty), mask=mm)
    tl.store(MAX + n * smax_n + p * smax_p, best.to(MAX.dtype.element_ty), mask=mm)
    tl.store(IDX + n * sidx_n + p * sidx_p, best_i, mask=mm)


@triton.jit
def pool_bwd_kernel(
    GX, GMEAN, GMAX, IDX,
    P, R, NPB, SPLIT, R_CHUNK,
    sgx_n, sgx_p, sgx_r,
    sgmean_n, sgmean_p,
    sgmax_n, sgmax_p,
    sidx_n, sidx_p,
    HAS_GMEAN: tl.constexpr,
    HAS_GMAX: tl.constexpr,
    ACC64: tl.constexpr,
    BP: tl.constexpr,
    BR: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pid = tl.program_id(0)
    split = pid % SPLIT
    rest = pid // SPLIT
    n = (rest // NPB).to(tl.int64)
    p = (rest % NPB) * BP + tl.arange(0, BP)
    pmask = p < P
    p64 = p.to(tl.int64)
    if HAS_GMEAN:
        gmean = tl.load(GMEAN + n * sgmean_n + p64 * sgmean_p, mask=pmask, other=0.0).to(acc_ty) / R
    else:
        gmean = tl.zeros((BP,), acc_ty)
    if HAS_GMAX:
        gmax = tl.load(GMAX + n * sgmax_n + p64 * sgmax_p, mask=pmask, other=0.0).to(acc_ty)
    else:
        gmax = tl.zeros((BP,), acc_ty)
    idx = tl.load(IDX + n * sidx_n + p64 * sidx_p, mask=pmask, other=-1)
    base = GX + n * sgx_n + p64[:, None] * sgx_p
    r_start = split * R_CHUNK
    for r0 in range(r_start, r_start + R_CHUNK, BR):
        r = r0 + tl.arange(0, BR)
        mask = pmask[:, None] & (r < R)[None, :]
        g = gmean[:, None] + tl.where(r[None, :] == idx[:, None], gmax[:, None], 0.0)
        tl.store(base + r[None, :].to(tl.int64) * sgx_r, g.to(GX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# launchers (x is 4-D [N, C, H, W]; ``spatial`` selects the reduced axis)


def _dims(x: torch.Tensor, spatial: bool) -> tuple[int, int, int]:
    n, c, h, w = x.shape
    return (n, h * w, c) if spatial else (n, c, h * w)


def fwd_config(x: torch.Tensor, spatial: bool) -> TileConfig:
    n, p, r = _dims(x, spatial)
    sp = npr_strides(x, spatial)[1]
    return tile_config(n, p, r, p_unit_stride=sp == 1 and p > 1, elem_bytes=x.element_size(), device=x.device)


def bwd_config(shape, spatial: bool, p_unit_stride: bool, elem_bytes: int, device) -> TileConfig:
    n, c, h, w = shape
    n, p, r = (n, h * w, c) if spatial else (n, c, h * w)
    return tile_config(n, p, r, p_unit_stride=p_unit_stride, elem_bytes=elem_bytes, device=device,
                       one_tile_per_program=True)


def pool_forward(x: torch.Tensor, spatial: bool, mean: torch.Tensor, mx: torch.Tensor, idx: torch.Tensor,
                 config: TileConfig | None = None) -> None:
    """Write mean, max and argmax of x along its reduced axis into the [N, P]-shaped (strided) ``mean``, ``mx``
    and ``idx``. R must be positive (the callers check it)."""
    x = as_npr(x)
    n, p, r = _dims(x, spatial)
    if n * p == 0:
        return
    cfg = config or fwd_config(x, spatial)
    npb = triton.cdiv(p, cfg.bp)
    finish = cfg.split == 1
    if finish:
        psum = pmax = pidx = idx
    else:
        acc = torch.float64 if acc_is_fp64(x.dtype) else torch.float32
        psum = torch.empty((cfg.split, n * p), dtype=acc, device=x.device)
        pmax = torch.empty((cfg.split, n * p), dtype=acc, device=x.device)
        pidx = torch.empty((cfg.split, n * p), dtype=torch.int32, device=x.device)
    launch(pool_fwd_kernel, (n * npb * cfg.split,),
        x, mean, mx, idx, psum, pmax, pidx, p, r, npb, cfg.split, cfg.r_chunk,
        *npr_strides(x, spatial), *mean.stride(), *mx.stride(), *idx.stride(),
        FINISH=finish, ACC64=acc_is_fp64(x.dtype), BP=cfg.bp, BR=cfg.br, num_warps=cfg.num_warps,
    )
    if not finish:
        m = n * p
        bm = min(next_pow2(m), 4096 if interpreted() else 256)
        launch(pool_combine_kernel, (triton.cdiv(m, bm),),
            psum, pmax, pidx, mean, mx, idx, cfg.split, m, p, r,
            *mean.stride(), *mx.stride(), *idx.stride(),
            BM=bm, num_warps=1 if interpreted() else 4,
        )


def pool_backward(gx: torch.Tensor, spatial: bool, gmean: torch.Tensor | None, gmax: torch.Tensor | None,
                  idx: torch.Tensor, config: TileConfig | None = None) -> torch.Tensor:
    """Fill ``gx`` (4-D, H and W mergeable) with the gradient of the pool; ``gmean``/``gmax``/``idx`` are [N, P]."""
    n, p, r = _dims(gx, spatial)
    if gx.numel() == 0:
        return gx
    strides = npr_strides(gx, spatial)
    cfg = config or bwd_config(gx.shape, spatial, strides[1] == 1 and p > 1, gx.element_size(), gx.device)
    npb = triton.cdiv(p, cfg.bp)
    dummy = idx
    gm = gmean if gmean is not None else dummy
    gM = gmax if gmax is not None else dummy
    launch(pool_bwd_kernel, (n * npb * cfg.split,),
        gx, gm, gM, idx, p, r, npb, cfg.split, cfg.r_chunk,
        *strides, *gm.stride(), *gM.stride(), *idx.stride(),
        HAS_GMEAN=gmean is not None, HAS_GMAX=gmax is not None, ACC64=acc_is_fp64(gx.dtype),
        BP=cfg.bp, BR=cfg.br, num_warps=cfg.num_warps,
    )
    return gx
