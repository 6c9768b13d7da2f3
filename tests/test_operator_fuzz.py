"""Fuzz test of every registered ``torch.ops.fastnas`` operator: seeded random shapes (zero and odd sizes included),
layouts (non-contiguous, channels_last, expanded), dtypes, and out-of-range integer and index arguments. Each call
must be right (checked against plain PyTorch where that is cheap) or raise a clear Python exception; corrupted index
tensors must raise. The cases run in a subprocess, so that a crash fails the test instead of killing pytest.

The operators are the kernels the def modules declare (``kernel_specs()``). A kernel without a hand-written case
below is called with the arguments its op passes it on the def module's sample inputs (random sizes and layouts),
against its reference: a new kernel is fuzzed without an edit here.

Under AddressSanitizer: build the library with ``cmake -S . -B build-asan -G Ninja -DFASTNAS_CUDA=OFF
-DFASTNAS_ASAN=ON && cmake --build build-asan`` and set ``FASTNAS_FUZZ_ASAN_LIB=build-asan/libfastnas_ops.so``; the
subprocess then loads that library with libasan preloaded, and any ASan report fails the test (docs/testing.md).
"""
from __future__ import annotations

import functools
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# longer runs: FASTNAS_FUZZ_SEED=... FASTNAS_FUZZ_CASES=...
SEED = int(os.environ.get("FASTNAS_FUZZ_SEED", "20261202"))
CASES = int(os.environ.get("FASTNAS_FUZZ_CASES", "400"))
ERRORS = (RuntimeError, ValueError, IndexError, TypeError)


# ------------------------------------------------------------------------------------------------ the cases

def _tensor(shape, dtype, layout, rng, low=None, high=None):
    import torch
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        base = _tensor((1, *shape[1:]), dtype, "contiguous", rng, low, high)
        return base.expand(*shape)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if low is not None:
        t = torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if len(shape) == 4 and layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided" and len(shape) >= 1:
        wide = torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted" and len(shape) == 4:
        return t.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    return t


class Case:
    """One call: the op, its arguments, a reference (None: no check) and whether it must raise."""

    def __init__(self, op, args, ref=None, must_raise=False):
        self.op, self.args, self.ref, self.must_raise = op, args, ref, must_raise


def _bad_int(rng):
    return rng.choice([-1, -7, 0, 256, 2**31, 2**40, 2**62])


def _gen_case(rng):
    import torch
    import torch.nn.functional as F

    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    layout = rng.choice(["contiguous", "channels_last", "strided", "expanded", "permuted"])
    N, C = rng.choice([0, 1, 2, 3]), rng.choice([0, 1, 3, 8, 17])
    H, W = rng.choice([0, 1, 2, 5, 7]), rng.choice([0, 1, 3, 6])
    shape = (N, C, H, W)
    t = lambda s=shape, d=dtype, lay=layout: _tensor(s, d, lay, rng)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    exact = dtype in (torch.float32, torch.float64)
    bad = rng.random() < 0.3  # mutate one argument
    op = rng.choice(_ops() + INDEXED)
    O = torch.ops.fastnas
    if op not in HANDWRITTEN:
        return _generic_case(op, rng, dtype if exact else torch.float32, layout, shape)

    if op == "mixed_sum":
        K = rng.choice([1, 2, 5, 9])
        xs, w = [t() for _ in range(K)], t((K,), acc, "contiguous")
        if bad:
            w = rng.choice([t((K + 1,)), t((K,), torch.int64, "contiguous"), t((K, 1))])
        ref = lambda: sum(wk * x.double() for wk, x in zip(w.double(), xs))  # noqa: E731
        return Case(op, (xs, w), ref if exact else None)
    if op == "mixed_sum_backward":
        K = rng.choice([1, 3])
        xs, w, g = [t() for _ in range(K)], t((K,), acc, "contiguous"), t()
        need = rng.random() < 0.5
        if bad:
            g = t((N + 1, C, H, W))
        ref = lambda: ([wk * g.double() for wk in w.double()] if need else [],  # noqa: E731
                       torch.stack([(g.double() * x.double()).sum() for x in xs]))
        return Case(op, (g, xs, w, need), ref if exact else None)
    if op == "mixed_sum_backward_xs":
        K = rng.choice([0, 1, 4])
        g, w = t(), t((K,), acc, "contiguous")
        if bad:
            w = t((K, 2))
        return Case(op, (g, w), (lambda: [wk * g.double() for wk in w.double()]) if exact else None)
    if op == "channel_pool":
        x = t()
        return Case(op, (x,), (lambda: (x.double().mean((2, 3)), x.double().amax((2, 3)))) if exact else None)
    if op == "channel_pool_backward":
        ga, gm = t((N, C), dtype, "contiguous"), t((N, C), dtype, "contiguous")
        arg = _tensor((N, C), torch.int32, "contiguous", rng, 0, max(1, H * W))
        h, w_, must = H, W, False
        if bad and N * C * H * W > 0 and rng.random() < 0.5:
            arg.view(-1)[rng.randrange(N * C)] = rng.choice([H * W, -1, 2**31 - 1])
            must = True
        elif bad and rng.random() < 0.3:
            arg = rng.choice([arg.long(), arg.to(torch.uint8), arg.float()])
        elif bad:
            h, w_ = rng.choice([(-1, W), (H, 2**31), (2**40, 2**40), (H + 1, W)])

        def ref():
            if H * W == 0:
                return torch.zeros(N, C, H, W)
            out = (ga.double() / (H * W))[:, :, None].expand(N, C, H * W).clone()
            out.scatter_add_(2, arg.long()[:, :, None], gm.double()[:, :, None])
            return out.view(N, C, H, W)
        return Case(op, (ga, gm, arg, h, w_, layout == "channels_last"), ref if exact and not bad else None, must)
    if op == "spatial_pool":
        x = t()
        ref = lambda: torch.stack([x.double().amax(1), x.double().mean(1)], 1)  # noqa: E731
        return Case(op, (x,), ref if exact and C > 0 else None)
    if op == "spatial_pool_backward":
        g = t((N, 2, H, W))
        arg = _tensor((N, H, W), torch.int32, "contiguous", rng, 0, max(1, C))
        c, must = C, False
        if bad and N * C * H * W > 0 and rng.random() < 0.5:
            arg.view(-1)[rng.randrange(N * H * W)] = rng.choice([C, -1, 2**31 - 1])
            must = True
        elif bad and rng.random() < 0.3:
            arg = rng.choice([arg.long(), arg[:, :, :0], arg.transpose(1, 2)])
        elif bad:
            c = rng.choice([-1, 2**31, 2**40])

        def ref():
            if C == 0:
                return torch.zeros(N, C, H, W)
            out = (g.double()[:, 1:2] / C).expand(N, C, H, W).clone()
            out.scatter_add_(1, arg.long()[:, None], g.double()[:, 0:1])
            return out
        return Case(op, (g, arg, c, layout == "channels_last"), ref if exact and not bad else None, must)
    if op in ("channel_scale", "spatial_scale", "channel_scale_backward", "spatial_scale_backward"):
        x = t()
        lshape = (N, C) if op.startswith("channel") else (N, 1, H, W)
        logits = t(lshape, rng.choice([dtype, acc]), "contiguous")
        if bad:
            logits = t(rng.choice([(N, C + 1), (N, 1, H, W + 1), (C,)]))
        def s():
            sig = torch.sigmoid(logits.double())
            return sig.view(N, C, 1, 1) if op.startswith("channel") else sig
        if not op.endswith("backward"):
            return Case(op, (x, logits), (lambda: x.double() * s()) if exact else None)
        g, need = t(), rng.random() < 0.7
        if bad and rng.random() < 0.5:
            g = t((N, C, H, W), torch.float64 if dtype != torch.float64 else torch.float32)

        def ref():
            dims = (2, 3) if op.startswith("channel") else (1,)
            d = (g.double() * x.double()).sum(dims).view(lshape)
            sig = torch.sigmoid(logits.double())
            return (g.double() * s() if need else torch.empty(0), d * sig * (1 - sig))
        return Case(op, (g, x, logits, need), ref if exact else None)
    if op in ("channel_gate", "channel_gate_backward"):
        hid = rng.choice([1, 2, 5])
        x = t()
        w1, w2 = t((hid, C), dtype, "contiguous"), t((C, hid), dtype, "contiguous")
        b1, b2 = rng.choice([None, t((hid,), dtype, "contiguous")]), rng.choice([None, t((C,), dtype, "contiguous")])
        if op == "channel_gate":
            if bad:
                w1 = rng.choice([t((hid, C + 1), dtype, "contiguous"), t((0, C), dtype, "contiguous")])

            def ref():
                def mlp(p):
                    h = F.relu(F.linear(p, w1.double(), None if b1 is None else b1.double()))
                    return F.linear(h, w2.double(), None if b2 is None else b2.double())
                xd = x.double()
                return xd * torch.sigmoid(mlp(xd.mean((2, 3))) + mlp(xd.amax((2, 3))))[:, :, None, None]
            return Case(op, (x, w1, b1, w2, b2), ref if exact and N * C * H * W > 0 else None)
        if N * C > 0 and H * W == 0:
            H, W = 1, 1
            x = t((N, C, 1, 1))
        _, _, hidden, logits, arg = torch.ops.fastnas.channel_gate(x, w1, b1, w2, b2)
        g, need, must = t(x.shape), rng.random() < 0.7, False
        if bad and N * C > 0 and rng.random() < 0.6:
            arg = arg.clone()
            arg.view(-1)[rng.randrange(N * C)] = rng.choice([H * W, -1, 2**30])
            must = True
        elif bad:
            arg = rng.choice([arg.long(), arg[:, :0], hidden])
        return Case(op, (g, x, arg, logits, hidden, w1, w2, need), None, must)
    if op == "depthwise_conv2d_weight_grad":
        k, s, p, d = [rng.choice([1, 3]), rng.choice([1, 3, 5])], [rng.choice([1, 2])] * 2, [1, rng.choice([0, 2])], \
            [rng.choice([1, 2])] * 2
        if bad:
            rng.choice([k, s, p, d])[rng.randrange(2)] = _bad_int(rng)
        Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1 if min(k + s + d) > 0 else 1
        Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1 if min(k + s + d) > 0 else 1
        if max(abs(Ho), abs(Wo)) > 64:
            Ho, Wo = 1, 1
        g, x = t((N, C, max(Ho, 0), max(Wo, 0))), t()

        def ref():
            return torch.nn.grad.conv2d_weight(x.double(), (C, 1, *k), g.double(), s, p, d, groups=C)
        return Case(op, (g, x, k, s, p, d), ref if exact and not bad and min(Ho, Wo, C, N, H, W) > 0 else None)
    if op in ("batch_norm_train", "batch_norm_affine_train"):
        x = t()
        rm, rv = t((C,), acc, "contiguous"), t((C,), acc, "contiguous").abs()
        if bad:
            rm = rng.choice([t((C + 1,), acc, "contiguous"), t((C, 1), acc, "contiguous")])
        ref = lambda: F.batch_norm(x.double(), None, None, training=True, eps=1e-5)  # noqa: E731
        if op == "batch_norm_train":
            return Case(op, (x, rm, rv, 0.1, 1e-5), (lambda: ref()) if exact else None)
        w, b = t((C,), acc, "contiguous"), t((C,), acc, "contiguous")
        return Case(op, (x, w, b, rm, rv, 0.1, 1e-5),
                    (lambda: ref() * w.double()[:, None, None] + b.double()[:, None, None]) if exact else None)
    if op == "batch_norm_backward":
        g, y, invstd = t(), t(), t((C,), acc, "contiguous").abs()
        if bad:
            invstd = rng.choice([t((C + 1,), acc, "contiguous"), t((C,), dtype if dtype != acc else torch.float16,
                                                                    "contiguous")])
        return Case(op, (g, y, invstd))
    if op == "batch_norm_affine_backward":
        g, x, w = t(), t(), t((C,), acc, "contiguous")
        mean, invstd = t((C,), acc, "contiguous"), t((C,), acc, "contiguous").abs()
        if bad:
            mean = t((max(0, C - 1),), acc, "contiguous")
        return Case(op, (g, x, w, mean, invstd, rng.random() < 0.5))
    if op in ("normalized_mixed_sum", "normalized_mixed_sum_backward"):
        K = rng.choice([1, 2, 4])
        n = rng.randrange(K + 1)
        zs, w = [t() for _ in range(K)], t((K,), acc, "contiguous")
        if op == "normalized_mixed_sum":
            rms = [t((C,), acc, "contiguous") for _ in range(n)]
            rvs = [t((C,), acc, "contiguous").abs() for _ in range(n)]
            if bad:
                choice = rng.randrange(3)
                if choice == 0:
                    n = rng.choice([-1, K + 1, 2**40])
                elif choice == 1:
                    rms = rms[:-1] if rms else [t((C,), acc, "contiguous")]
                else:
                    rvs = [t((C + 1,), acc, "contiguous") for _ in range(n)]

            def ref():
                bn = lambda z: F.batch_norm(z.double(), None, None, training=True, eps=1e-5)  # noqa: E731
                return sum(w.double()[k] * (bn(z) if k < n else z.double()) for k, z in enumerate(zs))
            return Case(op, (zs, w, n, rms, rvs, 0.1, 1e-5), ref if exact else None)
        means, invstds = t((n, C), acc, "contiguous"), t((n, C), acc, "contiguous").abs()
        need_z, need_w = rng.random() < 0.6, rng.random() < 0.6
        if bad:
            choice = rng.randrange(4)
            if choice == 0:
                means, invstds = t((K + 1, C), acc, "contiguous"), t((K + 1, C), acc, "contiguous")
            elif choice == 1:
                zs = zs[: max(0, n - 1)]
            elif choice == 2:
                w = t((K, 1), acc, "contiguous")
            else:
                means = t((), acc, "contiguous")
        return Case(op, (t(), zs, w, means, invstds, need_z, need_w))
    if op in ("single_channel_conv2d", "single_channel_conv2d_backward"):
        kh, kw = rng.choice([1, 3, 7]), rng.choice([1, 2, 3])
        p = [rng.randrange(kh), rng.randrange(kw)]
        if bad:
            p[rng.randrange(2)] = _bad_int(rng)
        x, wt = t(), t((1, C, kh, kw), dtype, "contiguous")
        if op == "single_channel_conv2d":
            ref = lambda: F.conv2d(x.double(), wt.double(), padding=p)  # noqa: E731
            return Case(op, (x, wt, p), ref if exact and min(N, C, H, W) > 0 else None)
        Ho, Wo = H + 2 * p[0] - kh + 1, W + 2 * p[1] - kw + 1
        g = t((N, 1, max(0, min(Ho, 64)), max(0, min(Wo, 64))))
        return Case(op, (g, x, wt, p, rng.random() < 0.6, rng.random() < 0.6))
    if op in ("max_pool2d", "avg_pool2d", "max_pool2d_backward", "avg_pool2d_backward"):
        k = [rng.choice([1, 2, 3]), rng.choice([1, 3, 5])]
        s, p = [rng.choice([1, 2]), rng.choice([1, 3])], [rng.randrange(k[0] // 2 + 1), rng.randrange(k[1] // 2 + 1)]
        if bad:
            rng.choice([k, s, p])[rng.randrange(2)] = _bad_int(rng)
        if not op.endswith("backward"):
            x = t()
            if op == "max_pool2d":
                ref = lambda: F.max_pool2d(x.double(), k, s, p)  # noqa: E731
            else:
                ref = lambda: F.avg_pool2d(x.double(), k, s, p, count_include_pad=False)  # noqa: E731
            ok = not bad and H + 2 * p[0] >= k[0] and W + 2 * p[1] >= k[1] and N * C > 0
            return Case(op, (x, k, s, p), ref if exact and ok and H * W > 0 else None)
        fits = min(k + s) > 0 and H + 2 * p[0] >= k[0] and W + 2 * p[1] >= k[1] and max(k + s + p) < 2**20
        Ho = (H + 2 * p[0] - k[0]) // s[0] + 1 if fits else 1
        Wo = (W + 2 * p[1] - k[1]) // s[1] + 1 if fits else 1
        g = t((N, C, Ho, Wo))
        if op == "avg_pool2d_backward":
            return Case(op, (g, H, W, k, s, p, layout == "channels_last"))
        must = False
        if fits and N * C * H * W > 0:  # the positions the forward saves, then perhaps one corrupted
            pos = O.max_pool2d(_tensor((N, C, H, W), torch.float32, "contiguous", rng), k, s, p)[1].contiguous()
            if rng.random() < 0.5:
                if p != [0, 0] and rng.random() < 0.5:
                    pos[0, 0, 0, 0] = 0  # the corner of the first window, which lies in the padding
                else:
                    pos.view(-1)[rng.randrange(pos.numel())] = rng.choice([255, k[0] * k[1]])
                must = True
        else:
            pos = _tensor((N, C, Ho, Wo), torch.uint8, "contiguous", rng, 0, 1)
        if bad and rng.random() < 0.3:
            pos = rng.choice([pos.long(), pos.transpose(2, 3)])
        return Case(op, (g, pos, H, W, k, s, p, layout == "channels_last"), None, must)
    raise AssertionError(op)


HANDWRITTEN = ("mixed_sum", "mixed_sum_backward", "mixed_sum_backward_xs", "channel_pool", "channel_pool_backward",
       "spatial_pool", "spatial_pool_backward", "channel_scale", "channel_scale_backward", "spatial_scale",
       "spatial_scale_backward", "channel_gate", "channel_gate_backward", "depthwise_conv2d_weight_grad",
       "batch_norm_train", "batch_norm_backward", "batch_norm_affine_train", "batch_norm_affine_backward",
       "normalized_mixed_sum", "normalized_mixed_sum_backward", "single_channel_conv2d",
       "single_channel_conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward")
# the backwards that index with a saved argmax, drawn twice as often
INDEXED = ("channel_pool_backward", "spatial_pool_backward", "channel_gate_backward", "max_pool2d_backward")
# build facts without tensor arguments
NO_TENSORS = ("cpu_capability", "cuda_arch_list")


def _ops() -> tuple[str, ...]:
    """Every kernel of the interface (the def modules' declarations)."""
    from fastnas.ops.backend import kernel_specs
    return tuple(sorted(kernel_specs()))


@functools.cache
def _kernel_calls(shape, dtype, channels_last: bool) -> dict:
    """kernel name -> the arguments of each of its calls (forward and backward) while the def modules' sample
    inputs run on the cpu backend."""
    from unittest import mock

    import torch

    import fastnas.ops as ops
    from fastnas.ops import defs

    calls: dict = {}
    kernels = ops.implementation("cpu", "cpu").kernels

    def recorder(name, kernel):
        def record(*args):
            copy = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else (  # noqa: E731
                [copy(t) for t in a] if isinstance(a, list) else a)
            calls.setdefault(name, []).append(tuple(copy(a) for a in args))
            return kernel(*args)
        return record

    with mock.patch.dict(kernels, {name: recorder(name, k) for name, k in kernels.items()}):
        for module in defs.modules():
            for sample in getattr(module, "sample_inputs", lambda *a: [])("cpu", dtype, shape):
                inputs = [t.detach().clone() for t in sample.inputs]
                if not channels_last:
                    inputs = [t.contiguous() for t in inputs]
                out = sample.call("cpu", *[t.requires_grad_() for t in inputs])
                outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
                torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    return calls


def _generic_case(op, rng, dtype, layout, shape):
    """A call of kernel ``op`` as its op makes it, on random sizes, checked against the kernel's reference."""
    from fastnas.ops.backend import kernel_specs

    size = rng.choice([(2, 3, 5, 3), (1, 4, 6, 7), (3, 2, 4, 4)])
    calls = _kernel_calls(size, dtype, layout == "channels_last").get(op)
    if not calls:
        raise ValueError(f"no sample input of a def module reaches the kernel {op}")
    args = rng.choice(calls)
    def clone(a):
        return a.clone() if hasattr(a, "clone") else [clone(t) for t in a] if isinstance(a, list) else a
    ref_args = tuple(clone(a) for a in args)
    return Case(op, args, lambda: kernel_specs()[op].reference(*ref_args))


def _compare(out, ref):
    import torch
    outs = out if isinstance(out, (tuple, list)) else [out]
    refs = ref if isinstance(ref, (tuple, list)) else [ref]
    for o, r in zip(outs, refs):
        if isinstance(r, (tuple, list)):
            _compare(o, r)
            continue
        tol = 1e-9 if o.dtype == torch.float64 else 1e-4
        torch.testing.assert_close(o.double(), r.double(), rtol=tol, atol=tol, equal_nan=True)


def run_cases(seed: int, cases: int) -> None:
    """The fuzz loop (in the subprocess): every case right or a clear exception; prints a tally."""
    import torch
    torch.set_num_threads(2)
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastnas::")}
    assert registered == set(_ops()) | set(NO_TENSORS), f"untested: {registered ^ (set(_ops()) | set(NO_TENSORS))}"
    rng = random.Random(seed)
    tally = {"ok": 0, "checked": 0, "raised": 0}
    for i in range(cases):
        state = rng.getstate()
        try:
            case = _gen_case(rng)
        except ERRORS:  # a case whose setup (a forward op) refused its arguments
            tally["raised"] += 1
            continue
        print(f"case {i} {case.op}", file=sys.stderr, flush=True)  # the last line names the case of a crash
        try:
            out = getattr(torch.ops.fastnas, case.op)(*case.args)
        except ERRORS as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            assert msg, f"case {i} ({case.op}): an exception without a message"
            tally["raised"] += 1
            continue
        assert not case.must_raise, f"case {i} ({case.op}): a corrupted index was accepted (rng state {state[1][:2]})"
        tally["ok"] += 1
        if case.ref is not None:
            try:
                _compare(out, case.ref())
            except AssertionError as e:
                raise AssertionError(f"case {i} ({case.op}): {e}") from None
            tally["checked"] += 1
    print("fuzz ok", cases, tally, flush=True)


def _run(env_extra, seed=SEED, cases=CASES, timeout=600):
    lib = env_extra.get("FASTNAS_FUZZ_LIB", "")
    # (the library registers implementations; importing fastnas.ops defines their schemas)
    load = f"import torch; torch.ops.load_library({lib!r}); import fastnas.ops" if lib else "import fastnas.ops"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); {load}; from tests.test_operator_fuzz import run_cases; "
            f"run_cases({seed}, {cases})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **env_extra})


def _built():
    try:
        import fastnas.ops.backends.cpp as cpp
    except ImportError:
        return False
    return cpp.backend_available("cpu")[0]


@pytest.mark.parametrize("op", ["mixed_sum_backward", "batch_norm_train", "channel_gate_backward", "max_pool2d"])
def test_generic_case_calls_a_kernel_as_its_op_does(op):
    """The case a kernel without a hand-written one gets: its op's own arguments, right against its reference."""
    if not _built():
        pytest.skip("fastnas._C is not built")
    import torch
    case = _generic_case(op, random.Random(0), torch.float64, "channels_last", None)
    _compare(getattr(torch.ops.fastnas, op)(*case.args), case.ref())


@pytest.mark.parametrize("capability", ["best", "default"])
def test_operators_are_right_or_raise_on_any_input(capability):
    if not _built():
        pytest.skip("fastnas._C is not built")
    env = {} if capability == "best" else {"FASTNAS_CPU_CAPABILITY": "default"}  # the portable kernels
    best = capability == "best"
    res = _run(env, seed=SEED if best else SEED + 1, cases=CASES if best else CASES // 4)
    assert res.returncode == 0 and "fuzz ok" in res.stdout, (
        f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")


def test_operators_under_address_sanitizer():
    """The same cases against a library built with -fsanitize=address (FASTNAS_FUZZ_ASAN_LIB)."""
    lib = os.environ.get("FASTNAS_FUZZ_ASAN_LIB")
    if not lib:
        pytest.skip("FASTNAS_FUZZ_ASAN_LIB is not set (docs/testing.md)")
    assert os.path.isfile(lib), f"FASTNAS_FUZZ_ASAN_LIB={lib} does not exist"
    # libasan first; libstdc++ too, or ASan's __cxa_throw interceptor finds no real one when torch throws
    preload = []
    for name in ("libasan.so", "libstdc++.so"):
        try:
            path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        except OSError as e:
            pytest.skip(f"no gcc to locate {name}: {e}")
        if not os.path.isabs(path) or not os.path.exists(path):
            pytest.skip(f"{name} not found (gcc -print-file-name={name}: {path!r})")
        preload.append(path)
    env = {"LD_PRELOAD": " ".join(preload), "FASTNAS_FUZZ_LIB": lib,
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"}
    # can ASan run here at all: load the library and raise one C++ exception through it
    smoke_code = (f"import torch; torch.ops.load_library({lib!r}); import fastnas.ops\n"
                  "try:\n    torch.ops.fastnas.mixed_sum([], torch.ones(0))\nexcept ValueError:\n    print('ok')")
    smoke = subprocess.run([sys.executable, "-c", smoke_code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **env})
    if smoke.returncode != 0 or "ok" not in smoke.stdout:
        if "ERROR: AddressSanitizer" in smoke.stderr:
            pytest.fail(f"ASan report while loading the library:\n{smoke.stderr[-6000:]}")
        pytest.skip(f"ASan cannot run here: {smoke.stderr.strip().splitlines()[-1:] or smoke.returncode}")
    res = _run(env)
    assert res.returncode == 0 and "fuzz ok" in res.stdout, (
        f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-8000:]}")
