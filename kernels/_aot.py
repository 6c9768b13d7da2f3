"""Ahead-of-time compilation of the kernels for a real GPU, on any machine (no GPU, interpreter or not).

:func:`capture_launches` runs launchers without running kernels: block sizes are chosen as on a GPU and every launch
(kernel, grid, arguments) is recorded. :func:`compile_launch` then specialises the recorded arguments exactly as
Triton's JIT does at launch time (dtypes, 16-byte alignment, integers equal to 1) and compiles the kernel to a cubin
for the given target with ``triton.compile``. A kernel that only works in the interpreter fails here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _common

SM90 = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _python_fn(self.kernel).__name__


def _python_fn(kernel):
    """The plain Python function under a ``@triton.jit`` (a JITFunction, or the interpreter's wrapper)."""
    fn = getattr(kernel, "fn", kernel)
    while not callable(fn) or hasattr(fn, "fn"):
        fn = fn.fn
    return fn


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the block, launchers record their launches (with GPU block sizes) instead of running them."""
    launches: list[Launch] = []
    prev = (_common._gpu_configs_forced, _common._launch_hook)
    _common._gpu_configs_forced = True
    _common._launch_hook = lambda kernel, grid, args, kwargs: launches.append(Launch(kernel, grid, args, dict(kwargs)))
    try:
        yield launches
    finally:
        _common._gpu_configs_forced, _common._launch_hook = prev


def specialize(launch: Launch, target: GPUTarget = SM90):
    """(jit function, signature, constexprs, attrs, options) of a launch, as Triton's JIT would build them."""
    jit_fn = JITFunction(_python_fn(launch.kernel))
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                              options)
    return jit_fn, signature, constexprs, attrs, options


def key(launch: Launch, target: GPUTarget = SM90) -> str:
    """What makes two launches compile to the same binary."""
    jit_fn, signature, constexprs, attrs, options = specialize(launch, target)
    return f"{launch.name}|{sorted(signature.items())}|{sorted(constexprs.items(), key=str)}|{sorted(attrs.items())}|" \
           f"{options.num_warps}"


def compile_launch(launch: Launch, target: GPUTarget = SM90):
    """Compile the kernel of ``launch`` for ``target`` (default sm_90); returns triton's CompiledKernel."""
    jit_fn, signature, constexprs, attrs, options = specialize(launch, target)
    src = ASTSource(jit_fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


# ---------------------------------------------------------------------------------------------------------------------
# the launches every op makes, on the shapes, layouts and dtypes that matter


def _scenarios() -> Iterator[tuple[str, Any]]:
    """(label, thunk) pairs; each thunk calls the launchers of one op direction on CPU tensors (nothing runs)."""
    import torch

    from . import mixed_sum as ms
    from . import pooling as pool
    from . import scale as sc

    darts, odd = (64, 16, 32, 32), (3, 17, 5, 7)
    cases = [(darts, dt, "nchw") for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    cases += [(darts, dt, "channels_last") for dt in (torch.float32, torch.bfloat16)]
    cases += [(odd, torch.float32, "nchw"), (odd, torch.float32, "channels_last")]
    cases += [((1, 1, 64, 64), torch.float32, "nchw")]  # sizes and strides equal to 1 (specialised as constants)

    def make(shape, dtype, layout):
        x = torch.randn(shape).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    for shape, dtype, layout in cases:
        label = f"{list(shape)} {dtype} {layout}"
        full = dtype == torch.float32 and shape == darts  # every flag combination only here
        pdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # AMP: fp32 weights/logits
        x = make(shape, dtype, layout)
        n, c, h, w = shape
        for k in (7, 11) if full else (7,):
            xs, wts = [make(shape, dtype, layout) for _ in range(k)], torch.randn(k, dtype=pdt)
            yield f"mixed_sum fwd K={k} {label}", lambda xs=xs, wts=wts: ms.mixed_sum_forward(xs, wts)
            for need in ((True, True), (True, False), (False, True)) if full else ((True, True),):
                yield (f"mixed_sum bwd K={k} need={need} {label}",
                       lambda xs=xs, wts=wts, need=need: ms.mixed_sum_backward(xs[0], xs, wts, *need))
        for spatial in (False, True):
            name = "spatial" if spatial else "channel"
            p_shape = (n, h * w) if spatial else (n, c)
            mean, mx = torch.empty(p_shape, dtype=dtype), torch.empty(p_shape, dtype=dtype)
            idx = torch.zeros(p_shape, dtype=torch.int32)
            yield f"{name}_pool fwd {label}", lambda x=x, s=spatial, a=mean, b=mx, i=idx: pool.pool_forward(x, s, a, b, i)
            yield (f"{name}_pool bwd {label}",
                   lambda x=x, s=spatial, a=mean, b=mx, i=idx: pool.pool_backward(torch.empty_like(x), s, a, b, i))
            logits = torch.randn((n, 1, h, w) if spatial else (n, c), dtype=pdt)
            yield (f"{name}_scale fwd {label}",
                   lambda x=x, s=spatial, lg=logits: sc.scale_forward(x, lg, s, torch.empty_like(x)))
            for need in ((True, True), (True, False), (False, True)) if full else ((True, True),):
                yield (f"{name}_scale bwd need={need} {label}",
                       lambda x=x, s=spatial, lg=logits, need=need: sc.scale_backward(
                           x, x, lg, s, torch.empty_like(x) if need[0] else None,
                           torch.empty(lg.shape, dtype=lg.dtype) if need[1] else None))


def main(argv: list[str] | None = None) -> int:
    """Compile every launch of every op for a GPU target; print one line per distinct binary. Exit 1 on failure.

    Run it in a process without ``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language`` in place, which
    breaks compilation in the same process): ``python -m fastnas.kernels._aot --arch 90``.
    """
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="one JSON object per binary")
    args = parser.parse_args(argv)
    if _common.os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter's patches break compilation in this process")
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    seen: dict[str, str] = {}
    failures = 0
    for label, thunk in _scenarios():
        with capture_launches() as launches:
            thunk()
        for launch in launches:
            k = key(launch, target)
            if k in seen:
                continue
            seen[k] = label
            t0 = time.perf_counter()
            try:
                compiled = compile_launch(launch, target)
            except Exception as exc:  # report every failure, not only the first
                failures += 1
                print(json.dumps({"kernel": launch.name, "case": label, "error": f"{type(exc).__name__}: {exc}"}))
                continue
            ptx = compiled.asm["ptx"]
            info = {
                "kernel": launch.name, "case": label, "grid": list(launch.grid),
                "num_warps": compiled.metadata.num_warps, "shared": compiled.metadata.shared,
                "ld_v4": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                "st_v4": ptx.count("st.global.v4"), "seconds": round(time.perf_counter() - t0, 2),
            }
            print(json.dumps(info) if args.json else " ".join(f"{k}={v}" for k, v in info.items()))
    print(f"compiled {len(seen) - failures} of {len(seen)} distinct kernels for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
