"""Export a trained model: ``python -m fastnas.export RUN_DIR --format onnx|torchscript|torch.export``.

The network is traced under the ``reference`` backend, so each fused op is written as its plain-PyTorch
decomposition: the exported file needs neither fastnas nor its compiled kernels (ONNX: standard operators only,
checked). The input is the normalised image batch ``images`` [N, C, S, S] (N dynamic; prepare images as the run's
``data.json`` says: resize, centre-crop, scale to [0, 1], normalise) and the output the ``logits`` [N, classes]; the
ONNX file carries the classes and the normalisation as metadata. Before the file is put in place, the exported model
is run (ONNX on onnxruntime) against PyTorch on a batch of another size, and the largest difference is printed.
Files are written to a temporary name and renamed, so a failed export leaves nothing behind.

ONNX needs ``onnx``, ``onnxruntime`` and ``onnxscript``: ``pip install fastnas[export]``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import ops
from .atomic import replacing
from .errors import ConfigError, FastNASError
from .evalnet import EvalNet, load_model

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "torch.export": "model.pt2"}
STANDARD_ONNX_DOMAINS = ("", "ai.onnx")
PROB_TOLERANCE = 1e-4


class ExportError(FastNASError):
    """The model could not be exported, or the exported model does not compute what the model does."""


def _require(modules: Sequence[str], what: str) -> None:
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}: pip install fastnas[export]")


def nonstandard_onnx_nodes(model) -> list[str]:
    """``domain::op`` of every node (subgraphs and functions included) outside the standard ONNX domain."""
    found = []

    def visit(graph):
        for node in graph.node:
            if node.domain not in STANDARD_ONNX_DOMAINS:
                found.append(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    for function in model.functions:
        found.append(f"function {function.domain}::{function.name}")
        visit(function)
    return found


def _probe_inputs(model: EvalNet) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch to trace with and a batch of another size to check with (the batch dimension is dynamic)."""
    g = torch.Generator().manual_seed(0)
    shape = (model.in_channels, model.input_size, model.input_size)
    return torch.randn(2, *shape, generator=g), torch.randn(3, *shape, generator=g)


def _compare(expected: torch.Tensor, got: torch.Tensor, what: str) -> tuple[float, float]:
    """(max |Δ logits|, max |Δ probabilities|); an ExportError when the probabilities differ beyond tolerance."""
    got = torch.as_tensor(got, dtype=torch.float32)
    if got.shape != expected.shape:
        raise ExportError(f"{what} gives logits of shape {list(got.shape)}, PyTorch {list(expected.shape)}")
    d_logits = float((got - expected).abs().max())
    d_probs = float((torch.softmax(got, 1) - torch.softmax(expected, 1)).abs().max())
    if not d_probs <= PROB_TOLERANCE:
        raise ExportError(f"{what} differs from PyTorch: max |difference| {d_logits:.3g} in the logits, "
                          f"{d_probs:.3g} in the probabilities (tolerance {PROB_TOLERANCE})")
    return d_logits, d_probs


def _export_onnx(model: EvalNet, example: torch.Tensor, path: str, opset: int | None) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
                          opset_version=opset)
    except Exception as exc:  # the exporter raises many kinds; the first line says what failed
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    proto = onnx.load(path)
    bad = nonstandard_onnx_nodes(proto)
    if bad:
        raise ExportError(f"the ONNX graph has non-standard ops: {', '.join(sorted(set(bad))[:5])}")
    info = getattr(model, "data_info", None)
    if info is not None:
        onnx.helper.set_model_props(proto, {"fastnas.classes": json.dumps(info["classes"]),
                                            "fastnas.mean": json.dumps(info["mean"]),
                                            "fastnas.std": json.dumps(info["std"]),
                                            "fastnas.image_size": str(info["image_size"]),
                                            "fastnas.in_channels": str(info["in_channels"])})
    onnx.save(proto, path)


def _run_onnx(path: str, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def _export_torchscript(model: EvalNet, example: torch.Tensor, path: str, opset=None) -> None:
    try:
        traced = torch.jit.trace(model, (example,), check_trace=False)
    except Exception as exc:
        raise ExportError(f"TorchScript tracing failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    if "fastnas::" in str(traced.inlined_graph):
        raise ExportError("the TorchScript graph calls fastnas kernels")
    torch.jit.save(traced, path)


def _run_torchscript(path: str, x: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(path, map_location="cpu")(x)


def _export_program(model: EvalNet, example: torch.Tensor, path: str, opset=None) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    custom = {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "fastnas" in str(n.target)}
    if custom:
        raise ExportError(f"the exported program calls fastnas kernels: {', '.join(sorted(custom))}")
    torch.export.save(program, path)


def _run_program(path: str, x: torch.Tensor) -> torch.Tensor:
    return torch.export.load(path).module()(x)


_EXPORTERS: dict[str, tuple[Callable, Callable, str]] = {
    "onnx": (_export_onnx, _run_onnx, "onnxruntime"),
    "torchscript": (_export_torchscript, _run_torchscript, "the TorchScript module"),
    "torch.export": (_export_program, _run_program, "the exported program"),
}


def check_finite_weights(model: torch.nn.Module, run_dir: str | Path) -> None:
    """An ExportError naming the first weight or statistic of ``model`` that holds a NaN or an infinity: such a
    model's outputs are not numbers, and no exported file could reproduce them."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ExportError(f"the model in {run_dir} has non-finite weights ({name} holds NaN or inf): "
                              f"there is nothing to export")


def export_model(run_dir: str | Path, fmt: str = "onnx", output: str | Path | None = None,
                 opset: int | None = None, overwrite: bool = False) -> tuple[Path, float, float]:
    """Export the model of ``run_dir`` as ``fmt`` to ``output`` (default: ``RUN_DIR/model.onnx``, ``.torchscript.pt``
    or ``.pt2``), checked against PyTorch first; an existing file is replaced only with ``overwrite``. Returns
    (path, max |Δ logits|, max |Δ probabilities|)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require(("onnx", "onnxruntime", "onnxscript"), "the ONNX export")
    model = load_model(run_dir, "cpu").float()
    check_finite_weights(model, run_dir)
    out = Path(output) if output is not None else Path(run_dir) / FORMATS[fmt]
    if out.is_dir():
        raise ConfigError(f"--output {out} is a folder; name the file to write")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or --output to write another file")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: the folder {out.parent} does not exist")
    export, run, runner = _EXPORTERS[fmt]
    example, check = _probe_inputs(model)
    suffix = ".pt2" if fmt == "torch.export" else ".tmp"  # torch.export.save wants its own suffix
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into {out.parent}: permission denied")
    try:
        with replacing(out, suffix) as tmp:
            # fused ops as their plain-PyTorch decomposition; the exporters' progress lines and their warnings
            # (tracer notes on shape checks, deprecations) are not the user's concern: what counts is the check below
            with ops.backend("reference"), torch.no_grad(), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                expected = model(check)
                export(model, example, tmp, opset)
                try:
                    got = run(tmp, check)
                except Exception as exc:
                    raise ExportError(f"{runner} cannot run the exported model: {type(exc).__name__}: "
                                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
            d_logits, d_probs = _compare(expected, got, runner)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out, d_logits, d_probs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastnas.export",
                                description="Export a trained model to a file that runs without fastnas.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a python -m fastnas.train run folder")
    p.add_argument("--format", dest="fmt", default="onnx", choices=list(FORMATS))
    p.add_argument("--output", help="file to write (default: RUN_DIR/model.onnx, model.torchscript.pt or model.pt2)")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file when it exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, d_logits, d_probs = export_model(args.run_dir, args.fmt, args.output, args.opset,
                                                   args.overwrite)
    except FastNASError as exc:
        print(f"fastnas.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    print(f"checked against PyTorch on {_EXPORTERS[args.fmt][2]}: max difference {d_logits:.3g} in the logits, "
          f"{d_probs:.3g} in the probabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
