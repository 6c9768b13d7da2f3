"""Helpers shared by the Triton kernel families: launch-size choice, layout views, partial-sum reduction.

Layout model. Every 4-D op is written over a 3-D view ``[N, P, R]`` of the ``[N, C, H, W]`` tensor: ``P`` is the axis
that is kept and ``R`` the one that is reduced over or broadcast along. For the channel ops ``P = C`` and
``R = H·W``; for the spatial ops ``P = H·W`` and ``R = C``. The view needs H and W to merge into one strided axis,
which holds for contiguous NCHW, channels_last and most slices; anything else is made contiguous first. Each tensor
passes its own three strides, so inputs, upstream gradients and outputs may differ in layout. Triton specialises
integer arguments equal to 1, so the unit-stride axis is known at compile time and its loads are vectorised.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import torch
import triton
import triton.language as tl

INT32_MAX = tl.constexpr(2**31 - 1)  # a constexpr global, so kernels may use it


# Set by kernels._aot while it records launches: block sizes are then chosen for the GPU even under the interpreter,
# and ``launch`` hands each launch to the hook instead of running it.
_gpu_configs_forced = False
_launch_hook: Callable[..., Any] | None = None


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): block sizes are then chosen
    for few programs, not for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not _gpu_configs_forced


def launch(kernel, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or the recording hook of :mod:`kernels._aot` when one is set."""
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


def tuning() -> tuple[int, int]:
    """(bytes of input per program step, programs per SM wanted) for the GPU block choice: 8192 and 4 unless
    ``FASTNAS_TRITON_TILE_BYTES`` / ``FASTNAS_TRITON_PROGRAMS_PER_SM`` say otherwise (read at every launch, so a
    benchmark can sweep them: ``python -m fastnas.kernels.bench --sweep``)."""
    return (int(os.environ.get("FASTNAS_TRITON_TILE_BYTES", 8192)),
            int(os.environ.get("FASTNAS_TRITON_PROGRAMS_PER_SM", 4)))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_is_fp64(dtype: torch.dtype) -> bool:
    """Accumulate in fp64 for fp64 activations, in fp32 otherwise (bf16/fp16/fp32)."""
    return dtype == torch.float64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if acc_is_fp64(dtype) else torch.float32


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 132, an H100/H200, for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# ---------------------------------------------------------------------------------------------------------------------
# layout


def hw_mergeable(t: torch.Tensor) -> bool:
    """Whether the H and W axes of a 4-D tensor form one strided axis (H·W elements, stride ``stride(3)``)."""
    _, _, h, w = t.shape
    return h <= 1 or w <= 1 or t.stride(2) == w * t.stride(3)


def npr_strides(t: torch.Tensor, spatial: bool) -> tuple[int, int, int]:
    """Strides of the ``[N, P, R]`` view of a 4-D tensor whose H and W merge (see the module docstring)."""
    sn, sc, sh, sw = t.stride()
    s_hw = sw if t.shape[3] > 1 else sh
    return (sn, s_hw, sc) if spatial else (sn, sc, s_hw)


def as_npr(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its H and W merge, else a contiguous copy."""
    return t if hw_mergeable(t) else t.contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# launch-size choice for the [N, P, R] kernels


class TileConfig(NamedTuple):
    """How a ``[N, P, R]`` kernel is cut: a ``[BP, BR]`` tile, ``split`` programs along R, each covering
    ``r_chunk`` elements of R (a multiple of BR), and the warps per program."""

    bp: int
    br: int
    split: int
    r_chunk: int
    num_warps: int

    def programs(self, n: int, p: int) -> int:
        return n * triton.cdiv(p, self.bp) * self.split


def tile_config(
    n: int,
    p: int,
    r: int,
    p_unit_stride: bool,
    elem_bytes: int,
    device: torch.device,
    *,
    split_r: bool = True,
    one_tile_per_program: bool = False,
) -> TileConfig:
    """Choose the tile and the R split for an ``[N, P, R]`` kernel.

    GPU: a tile moves ~8 KiB of its input per step (2048 fp32 / 4096 half elements), ``BP × BR`` shaped so that the
    unit-stride axis is the long one (whole 16-byte vectors per thread), and R is split over programs until there are
    about four programs per SM (their partial sums are reduced in a second, ordered pass). Under the interpreter each
    program costs milliseconds of Python, so the tile is as large as the tensor allows (up to 64 Ki elements) and R is
    not split: the fewest programs.
    """
    interp = interpreted()
    tile_bytes, per_sm = tuning()
    tile = 1 << 16 if interp else max(tile_bytes // max(elem_bytes, 1), 64)
    p2, r2 = next_pow2(max(p, 1)), next_pow2(max(r, 1))
    if p_unit_stride:
        bp = min(p2, tile, 64 if not interp else tile)
        br = min(r2, max(tile // bp, 1))
    else:
        br = min(r2, tile)
        bp = min(p2, max(tile // br, 1))
    tiles_r = max(triton.cdiv(r, br), 1)
    if one_tile_per_program:
        split = tiles_r
    elif interp or not split_r:
        split = 1
    else:
        base = n * triton.cdiv(p, bp)
        target = per_sm * sm_count(device)
        split = min(tiles_r, max(1, triton.cdiv(target, max(base, 1))))
    r_chunk = triton.cdiv(tiles_r, split) * br
    split = max(triton.cdiv(r, r_chunk), 1)
    num_warps = 1 if interp else (8 if bp * br >= 2048 else 4 if bp * br >= 512 else 2)
    return TileConfig(bp, br, split, r_chunk, num_warps)


# ---------------------------------------------------------------------------------------------------------------------
# ordered reduction of per-program partial sums


@triton.jit
def sum_partials_kernel(
    PART,  # [SPLIT, M] partial sums, fp32 (fp64 for fp64 inputs), row-major
    L,  # [N, P] logits (strided) when SIGMOID_GRAD, else unused
    OUT,  # [M] result, contiguous, in the gradient's dtype
    SPLIT,
    M,
    P,
    sl_n,
    sl_p,
    SIGMOID_GRAD: tl.constexpr,
    BS: tl.constexpr,
    BM: tl.constexpr,
):
    """OUT[m] = Σ_s PART[s, m] (times s(1−s), s = sigmoid(L[m]) when SIGMOID_GRAD), summed in a fixed order."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    mm = m < M
    acc = tl.zeros((BS, BM), PART.dtype.element_ty)
    for s0 in range(0, SPLIT, BS):
        s = s0 + tl.arange(0, BS)
        mask = (s < SPLIT)[:, None] & mm[None, :]
        acc += tl.load(PART + s[:, None].to(tl.int64) * M + m[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if SIGMOID_GRAD:
        m64 = m.to(tl.int64)
        lg = tl.load(L + (m64 // P) * sl_n + (m64 % P) * sl_p, mask=mm, other=0.0).to(PART.dtype.element_ty)
        sg = 1.0 / (1.0 + tl.exp(-lg))
        total = total * (sg * (1.0 - sg))
    tl.store(OUT + m, total.to(OUT.dtype.element_ty), mask=mm)


def sum_partials(part: torch.Tensor, out: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce ``part`` [SPLIT, M] over its first axis into ``out`` (contiguous, M elements), deterministically.

    With ``logits`` (viewed [N, P], P·N = M), multiply by the sigmoid derivative of the logits (the scale ops)."""
    split, m = part.shape
    if m == 0:
        return out
    bm = min(next_pow2(m), 4096 if interpreted() else 256)
    bs = min(next_pow2(split), max(1, (1 << 16 if interpreted() else 2048) // bm))
    if logits is not None:
        p = logits.shape[1]
        sl_n, sl_p = logits.stride(0), logits.stride(1)
        lg = logits
    else:
        p, sl_n, sl_p, lg = 1, 0, 0, part
    launch(sum_partials_kernel, (triton.cdiv(m, bm),),
        part, lg, out, split, m, p, sl_n, sl_p,
        SIGMOID_GRAD=logits is not None, BS=bs, BM=bm, num_warps=1 if interpreted() else 4,
    )
    return out
