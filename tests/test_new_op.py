"""A new op through the documented path: a throwaway op with reference kernels only, written as the files that
docs/adding-an-op.md lists (in a temporary tree, found by the same discovery as the package's ops), then the shared
op suite on it: on every backend here, on the toy backend, and on a toy backend that has its kernels. It runs in a
subprocess, so that the op stays out of this test session's registry."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = "scaled_difference"

# the whole op: public function, reference, kernels with their schemas, autograd, sample inputs
DEF_MODULE = '''
"""scaled_difference: alpha·(x − y) (a throwaway op of the tests)."""
from __future__ import annotations

import torch

from fastnas.ops import checks, layout
from fastnas.ops.backend import select
from fastnas.ops.opdef import Kernel, Op, Sample, backward_kernels, tensor

OP = "scaled_difference"


def reference(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return alpha * (x - y)


def _kernel(x, y, alpha):
    return layout.like(x).copy_(reference(x, y, alpha))


def _backward_kernel(grad, alpha):
    return layout.like(grad).copy_(alpha * grad)


KERNELS = {OP: Kernel("(Tensor x, Tensor y, float alpha) -> Tensor", _kernel),
           f"{OP}_backward": Kernel("(Tensor grad, float alpha) -> Tensor", _backward_kernel)}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd(kernels):
    def setup_context(ctx, inputs, output):
        ctx.alpha = inputs[2]

    def backward(ctx, grad):
        gx = backward_kernels(kernels, REFERENCES)[f"{OP}_backward"](grad, ctx.alpha)
        return gx, -gx, None

    return backward, setup_context


AUTOGRAD = {OP: _autograd}


def scaled_difference(x, y, alpha=1.0, *, backend=None):
    checks.check_4d(OP, "x", x)
    checks.check_4d(OP, "y", y)
    kernel = select(x.device.type, backend).kernels.get(OP)
    return reference(x, y, alpha) if kernel is None else kernel(x, y, float(alpha))


OPS = {OP: Op(scaled_difference, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)):
    x, y = tensor(shape, device, dtype, channels_last=True), tensor(shape, device, dtype, seed=1)
    return [Sample(OP, [x, y], lambda b, x, y: scaled_difference(x, y, 0.5, backend=b), amp=True)]
'''

RUN = '''
import sys
sys.path.insert(0, {tests!r})
import fastnas.ops as ops
from fastnas.ops import defs
from fastnas.ops.backend import define_kernels, kernel_specs, register_backend

defs.__path__.append({defs_dir!r})
(module,) = defs.discover()
assert module.__name__ == "fastnas.ops.defs.{op}", module.__name__
assert ops.{op} is module.{op} and ops.reference.{op} is module.reference

import test_op_suite as suite
from helpers import BACKENDS, backend_targets

kernels = {{name: spec.reference for name, spec in kernel_specs().items() if spec.required or name in module.KERNELS}}
register_backend("toy_{op}", define_kernels("fastnas_toy_{op}", kernels), ("cpu",))
every, amp = suite.cases([module])
assert [p.values[1] for p in every] == ["{op}"] == [p.values[1] for p in amp]
ran = []
for target in backend_targets(BACKENDS + ("toy", "toy_{op}")):
    name, device = target.values
    for case in every:
        suite.check_case(name, device, *case.values)
        ran.append(name)
calls = suite._operator_calls("toy_{op}", "cpu", module, "{op}")
assert [str(call) for call, _ in calls] == ["fastnas_toy_{op}.{op}.default"], calls
print("ran on", ran)
'''


def _documented_files() -> list[str]:
    """The files docs/adding-an-op.md says an op with reference kernels only needs."""
    with open(os.path.join(ROOT, "docs", "adding-an-op.md")) as f:
        doc = f.read()
    block = re.search(r"<!-- files: reference kernels only.*?-->\s*```\n(.*?)```", doc, re.S)
    assert block, "docs/adding-an-op.md has no list of the files of an op with reference kernels only"
    return sorted(line.strip() for line in block.group(1).splitlines() if line.strip())


def test_a_new_op_needs_the_documented_files_and_passes_the_shared_suite(tmp_path):
    defs_dir = tmp_path / "fastnas" / "ops" / "defs"
    defs_dir.mkdir(parents=True)
    (defs_dir / f"{OP}.py").write_text(DEF_MODULE)
    written = sorted(str(p.relative_to(tmp_path)).replace(OP, "my_op") for p in tmp_path.rglob("*") if p.is_file())
    assert written == _documented_files()

    code = textwrap.dedent(RUN.format(tests=os.path.join(ROOT, "tests"), defs_dir=str(defs_dir), op=OP))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0 and "ran on" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]
    for backend in ("reference", "toy", "toy_" + OP):  # (and every other backend that runs here)
        assert repr(backend) in res.stdout, res.stdout


def test_ops_take_their_autograd_from_the_registry_alone():
    """No op or module defines its own autograd or asks whether it is being compiled: every op's backward is
    registered through fastnas.ops.opdef, whose kernel builder is the one ``torch.autograd.Function``."""
    found = []
    for folder in ("ops", "nn"):
        for path in sorted((Path(ROOT) / "fastnas" / folder).rglob("*.py")):
            text = path.read_text()
            for word in ("is_compiling", "autograd.Function"):
                if word in text and path.relative_to(ROOT).as_posix() != "fastnas/ops/opdef.py":
                    found.append(f"{path.relative_to(ROOT)}: {word}")
    assert not found, found
    assert "is_compiling" not in (Path(ROOT) / "fastnas" / "ops" / "opdef.py").read_text()
