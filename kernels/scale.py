"""channel_scale and spatial_scale: y = x · sigmoid(logits) broadcast along one axis, forward and backward.

Both ops are one kernel pair over the ``[N, P, R]`` view of x (see :mod:`kernels._common`), with logits [N, P]:
channel_scale has P = C (logits [N, C]) and broadcasts along R = H·W; spatial_scale has P = H·W (logits
[N, 1, H, W]) and broadcasts along R = C.

Forward (``scale_fwd_kernel``): one ``[BP, BR]`` tile per program; sigmoid of the BP logits once per program.

Backward (``scale_bwd_kernel``): program (n, block of BP rows, split s) covers R-range
``[s·R_CHUNK, (s+1)·R_CHUNK)`` in ``[BP, BR]`` tiles: it writes grad x = g·s and accumulates Σ g·x per lane of the
tile, then reduces the lanes (a tree sum in a fixed order). With one split the program finishes the logits gradient
itself (· s(1−s)); with several, it writes its partial sums to ``[SPLIT, N·P]`` and the ordered second pass
:func:`kernels._common.sum_partials` adds them and applies s(1−s). No float atomics: the logits gradient is bitwise
reproducible for a given launch configuration.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TileConfig, launch, acc_dtype, acc_is_fp64, as_npr, npr_strides, sum_partials, tile_config


@triton.jit
def scale_fwd_kernel(
    Y, X, L,
    P, R, NPB, SPLIT, R_CHUNK,
    sy_n, sy_p, sy_r,
    sx_n, sx_p, sx_r,
    sl_n, sl_p,
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
    lg = tl.load(L + n * sl_n + p64 * sl_p, mask=pmask, other=0.0).to(acc_ty)
    s = (1.0 / (1.0 + tl.exp(-lg)))[:, None]
    x_base = X + n * sx_n + p64[:, None] * sx_p
    y_base = Y + n * sy_n + p64[:, None] * sy_p
    r_start = split * R_CHUNK
    for r0 in range(r_start, r_start + R_CHUNK, BR):
        r = r0 + tl.arange(0, BR)
        mask = pmask[:, None] & (r < R)[None, :]
        r64 = r[None, :].to(tl.int64)
        x = tl.load(x_base + r64 * sx_r, mask=mask, other=0.0).to(acc_ty)
        tl.store(y_base + r64 * sy_r, (x * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def scale_bwd_kernel(
    GX, GL, PART, G, X, L,
    P, R, NPB, SPLIT, R_CHUNK, part_stride,
    sgx_n, sgx_p, sgx_r,
    sg_n, sg_p, sg_r,
    sx_n, sx_p, sx_r,
    sl_n, sl_p,
    sgl_n, sgl_p,
    NEED_X: tl.constexpr,
    NEED_L: tl.constexpr,
    FINISH: tl.constexpr,  # one split: write the logits gradient directly, else partial sums to PART[split, n*P+p]
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
    lg = tl.load(L + n * sl_n + p64 * sl_p, mask=pmask, other=0.0).to(acc_ty)
    sg = 1.0 / (1.0 + tl.exp(-lg))
    s = sg[:, None]
    g_base = G + n * sg_n + p64[:, None] * sg_p
    x_base = X + n * sx_n + p64[:, None] * sx_p
    gx_base = GX + n * sgx_n + p64[:, None] * sgx_p
    acc = tl.zeros((BP, BR), acc_ty)
    r_start = split * R_CHUNK
    for r0 in range(r_start, r_start + R_CHUNK, BR):
        r = r0 + tl.arange(0, BR)
        mask = pmask[:, None] & (r < R)[None, :]
        r64 = r[None, :].to(tl.int64)
        g = tl.load(g_base + r64 * sg_r, mask=mask, other=0.0).to(acc_ty)
        if NEED_X:
            tl.store(gx_base + r64 * sgx_r, (g * s).to(GX.dtype.element_ty), mask=mask)
        if NEED_L:
            x = tl.load(x_base + r64 * sx_r, mask=mask, other=0.0).to(acc_ty)
            acc += g * x
    if NEED_L:
        row = tl.sum(acc, axis=1)
        if FINISH:
            tl.store(GL + n * sgl_n + p64 * sgl_p, (row * (sg * (1.0 - sg))).to(GL.dtype.element_ty), mask=pmask)
        else:
            tl.store(PART + split.to(tl.int64) * part_stride + n * P + p64, row, mask=pmask)


# ---------------------------------------------------------------------------------------------------------------------
# launchers (x is 4-D [N, C, H, W]; ``spatial`` selects the broadcast axis)


def _dims(x: torch.Tensor, spatial: bool) -> tuple[int, int, int]:
    n, c, h, w = x.shape
    return (n, h * w, c) if spatial else (n, c, h * w)


def logits_2d(logits: torch.Tensor, spatial: bool) -> torch.Tensor:
    """The logits as an [N, P] (strided) tensor: [N, C] as is, [N, 1, H, W] viewed as [N, H·W]."""
    if not spatial:
        return logits
    return as_npr(logits).reshape(logits.shape[0], logits.shape[2] * logits.shape[3])


def config(x: torch.Tensor, spatial: bool, *, backward: bool) -> TileConfig:
    n, p, r = _dims(x, spatial)
    sp = npr_strides(x, spatial)[1]
    return tile_config(n, p, r, p_unit_stride=sp == 1 and p > 1, elem_bytes=x.element_size(), device=x.device,
                       one_tile_per_program=not backward)


def scale_forward(x: torch.Tensor, logits: torch.Tensor, spatial: bool, y: torch.Tensor,
                  cfg: TileConfig | None = None) -> torch.Tensor:
    """Write x · sigmoid(logits) into ``y`` (4-D, H and W mergeable)."""
    if y.numel() == 0:
        return y
    x = as_npr(x)
    lg = logits_2d(logits, spatial)
    n, p, r = _dims(x, spatial)
    cfg = cfg or config(x, spatial, backward=False)
    npb = triton.cdiv(p, cfg.bp)
    launch(scale_fwd_kernel, (n * npb * cfg.split,),
        y, x, lg, p, r, npb, cfg.split, cfg.r_chunk,
        *npr_strides(y, spatial), *npr_strides(x, spatial), *lg.stride(),
        ACC64=acc_is_fp64(x.dtype), BP=cfg.bp, BR=cfg.br, num_warps=cfg.num_warps,
    )
    return y


def scale_backward(g: torch.Tensor, x: torch.Tensor | None, logits: torch.Tensor, spatial: bool,
                   gx: torch.Tensor | None, gl: torch.Tensor | None, cfg: TileConfig | None = None) -> None:
    """Fill ``gx`` (grad of x, 4-D, H and W mergeable; None if not needed) and ``gl`` (grad of the logits,
    contiguous, logits' shape; None if not needed). ``x`` is needed only for ``gl``."""
    need_x, need_l = gx is not None, gl is not None
    if not (need_x or need_l):
        return
    g = as_npr(g)
    n, p, r = _dims(g, spatial)
    if n * p == 0:
        return
    if r == 0:  # nothing to scale; the logits gradient is an empty sum
        if need_l:
            gl.zero_()
        return
    lg = logits_2d(logits, spatial)
    gl2 = gl.view(n, p) if need_l else None
    if need_l:
        x = as_npr(x)
    cfg = cfg or config(x if need_l else g, spatial, backward=True)
    npb = triton.cdiv(p, cfg.bp)
    finish = cfg.split == 1
    part = None
    if need_l and not finish:
        part = torch.empty((cfg.split, n * p), dtype=acc_dtype(g.dtype), device=g.device)
    gx_ = gx if need_x else g
    x_ = x if need_l else g
    gl_ = gl2 if need_l else lg
    launch(scale_bwd_kernel, (n * npb * cfg.split,),
        gx_, gl_, part if part is not None else g, g, x_, lg,
        p, r, npb, cfg.split, cfg.r_chunk, n * p,
        *npr_strides(gx_, spatial), *npr_strides(g, spatial), *npr_strides(x_, spatial), *lg.stride(),
        *gl_.stride(),
        NEED_X=need_x, NEED_L=need_l, FINISH=finish, ACC64=acc_is_fp64(g.dtype),
        BP=cfg.bp, BR=cfg.br, num_warps=cfg.num_warps,
    )
    if part is not None:
        sum_partials(part, gl2.view(-1), lg)
