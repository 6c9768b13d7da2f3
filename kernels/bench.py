"""Bandwidth of each op's forward + backward against the device's copy bandwidth (the issue's acceptance check).

``python -m fastnas.kernels.bench`` (on a GPU) prints, per op, dtype and layout at the DARTS search shape
(batch 64, C = 16, 32×32, K = 7): the time of forward + backward, the bytes they must move at least, the achieved
bandwidth and its ratio to the bandwidth of a large device copy (``dst.copy_(src)``, 2 × bytes per copy).

Two timings per case:
- ``kernels``: the launchers alone (the Triton kernels and their small second passes), replayed in a CUDA graph so
  the Python launch overhead is not counted; ``--sets`` input sets are rotated so that the working set exceeds L2;
- ``autograd``: the public op with autograd (``y = op(...); torch.autograd.backward(y, g)``), eager, as a search
  step runs it — Python dispatch included; at this shape it is dominated by CPU overhead.

``--dry`` runs every case once on the CPU (interpreter) at a tiny shape, to check the script itself.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import torch


def _minimal_bytes(op: str, shape, k: int, elem: int) -> int:
    n, c, h, w = shape
    s = n * c * h * w * elem
    return {
        "mixed_sum": (3 * k + 2) * s,  # fwd: read K, write 1; bwd: read g and K inputs, write K
        "channel_pool": 2 * s,  # fwd: read x; bwd: write grad x
        "spatial_pool": 2 * s + 4 * s // c,  # + the [N, 2, H, W] output and its gradient
        "channel_scale": 5 * s,  # fwd: read x, write y; bwd: read g and x, write grad x
        "spatial_scale": 5 * s,
    }[op]


def _launcher_step(op: str, xs, params, grads) -> Callable[[], None]:
    """Forward + backward through the kernel launchers only (what the custom ops run)."""
    from . import mixed_sum as ms
    from . import pooling as pool
    from . import scale as sc

    x = xs[0]
    n, c, h, w = x.shape
    if op == "mixed_sum":
        return lambda: (ms.mixed_sum_forward(xs, params), ms.mixed_sum_backward(grads, xs, params, True, True))
    if op in ("channel_pool", "spatial_pool"):
        spatial = op == "spatial_pool"
        p_shape = (n, h * w) if spatial else (n, c)
        mean, mx = x.new_empty(p_shape), x.new_empty(p_shape)
        idx = torch.empty(p_shape, dtype=torch.int32, device=x.device)
        gx = torch.empty_like(x)

        def step():
            pool.pool_forward(x, spatial, mean, mx, idx)
            pool.pool_backward(gx, spatial, grads[0], grads[1], idx)
        return step
    spatial = op == "spatial_scale"
    y, gx = torch.empty_like(x), torch.empty_like(x)
    gl = torch.empty(params.shape, dtype=params.dtype, device=x.device)

    def step():
        sc.scale_forward(x, params, spatial, y)
        sc.scale_backward(grads, x, params, spatial, gx, gl)
    return step


def _inputs(op: str, shape, k: int, dtype, layout, device):
    n, c, h, w = shape

    def t(*s, dt=dtype):
        v = torch.randn(*s, device=device, dtype=dt)
        return v.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and v.dim() == 4 else v

    pdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    if op == "mixed_sum":
        return [t(*shape) for _ in range(k)], torch.randn(k, device=device, dtype=pdt), t(*shape)
    if op == "channel_pool":
        return [t(*shape)], None, (torch.randn(n, c, device=device, dtype=dtype),) * 2
    if op == "spatial_pool":
        return [t(*shape)], None, (torch.randn(n, h * w, device=device, dtype=dtype),) * 2
    logits = torch.randn((n, 1, h, w) if op == "spatial_scale" else (n, c), device=device, dtype=pdt)
    return [t(*shape)], logits, t(*shape)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    import triton.testing

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * nbytes / (ms * 1e-3)


def _graph_time(step: Callable[[], None], reps: int = 50) -> float:
    """Seconds per call of ``step``, replayed from a CUDA graph (no Python overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3 / reps)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 16, 32, 32])
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    parser.add_argument("--ops", nargs="+",
                        default=["mixed_sum", "channel_pool", "channel_scale", "spatial_pool", "spatial_scale"])
    parser.add_argument("--sets", type=int, default=8, help="input sets rotated in the graph (working set > L2)")
    parser.add_argument("--no-autograd", action="store_true")
    parser.add_argument("--dry", action="store_true", help="tiny shape, CPU, interpreter: check the script")
    parser.add_argument("--sweep", action="store_true",
                        help="repeat for tile bytes 4096/8192/16384 x programs per SM 2/4/8 (kernels timing only)")
    args = parser.parse_args(argv)
    if args.sweep:
        rest = [a for a in (argv if argv is not None else __import__("sys").argv[1:]) if a != "--sweep"]
        for tile_bytes in (4096, 8192, 16384):
            for per_sm in (2, 4, 8):
                os.environ["FASTNAS_TRITON_TILE_BYTES"], os.environ["FASTNAS_TRITON_PROGRAMS_PER_SM"] = \
                    str(tile_bytes), str(per_sm)
                print(f"== FASTNAS_TRITON_TILE_BYTES={tile_bytes} FASTNAS_TRITON_PROGRAMS_PER_SM={per_sm}")
                main(rest + ["--no-autograd"])
        return 0

    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shape = torch.device("cpu"), (2, 3, 4, 5)
    else:
        device, shape = torch.device("cuda"), tuple(args.shape)
    import fastnas.ops as ops

    copy_bw = None if args.dry else copy_bandwidth(device)
    if copy_bw:
        print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s ({torch.cuda.get_device_name(device)})")
    print(f"{'op':14s} {'dtype':9s} {'layout':14s} {'MB':>7s} {'kern us':>8s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'autograd us':>11s}")
    worst = float("inf")
    for op in args.ops:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for layout in args.layouts:
                nbytes = _minimal_bytes(op, shape, args.k, torch.empty(0, dtype=dtype).element_size())
                sets = [_inputs(op, shape, args.k, dtype, layout, device) for _ in range(1 if args.dry else args.sets)]
                steps = [_launcher_step(op, *s) for s in sets]
                if args.dry:
                    for st in steps:
                        st()
                    t_kern = float("nan")
                else:
                    t_kern = _graph_time(lambda: [st() for st in steps]) / len(steps)
                bw = nbytes / t_kern
                ratio = bw / copy_bw if copy_bw else float("nan")
                worst = min(worst, ratio) if copy_bw else worst
                t_ag = float("nan")
                if not args.no_autograd:
                    xs, params, _ = sets[0]
                    leaves = [x.detach().requires_grad_() for x in xs]
                    p = params.detach().requires_grad_() if params is not None else None

                    def ag():
                        if op == "mixed_sum":
                            y = ops.mixed_sum(leaves, p, backend="triton")
                        elif p is None:
                            y = getattr(ops, op)(leaves[0], backend="triton")
                        else:
                            y = getattr(ops, op)(leaves[0], p, backend="triton")
                        outs = list(y) if isinstance(y, tuple) else [y]
                        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                    if args.dry:
                        ag()
                    else:
                        import triton.testing
                        t_ag = triton.testing.do_bench(ag, warmup=10, rep=50) * 1e-3
                print(f"{op:14s} {dtype_name:9s} {layout:14s} {nbytes / 1e6:7.1f} {t_kern * 1e6:8.1f} "
                      f"{bw / 1e9:7.0f} {100 * ratio:5.0f}% {t_ag * 1e6:11.1f}")
    if copy_bw:
        print(f"worst ratio to copy bandwidth: {100 * worst:.0f}% (target 70%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
