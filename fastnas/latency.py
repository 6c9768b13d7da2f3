"""Measured latency of ops on a target, as a lookup table (``latency_table.json``) for
:class:`fastnas.costmodel.CostModel`.

Each entry is one op on C channels at a stride and input side, run in eval mode on a batch of ``batch`` images: a few
warm-up calls, then the median of ``repeats`` timed calls (the device synchronised around each on CUDA). The fixed
parts of a network (stems, preprocessing, classifier) are the measured latency of its skeleton
(:meth:`fastnas.costmodel.CostModel.skeleton`: max pooling on every edge) less the table's max-pooling entries.
The table records the target, threads, batch, clock and library versions. The sum of isolated ops' latencies misses
what they cost inside a network (dispatch of every edge, caches): :func:`fit_correction` fits an offset b and a
factor k on measured networks, so that a network's latency is predicted as fixed + b + k · Σ ops (``offset_ms`` and
``op_scale`` in the table). A table loaded with ``--latency-table FILE`` must hold every entry a cost needs (it is
never extended on another machine).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError
from .genotype import gene_rows

TARGETS = ("cpu", "cuda", "onnxruntime")
TABLE_FILE = "latency_table.json"


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_ms(run: Callable[[], object], warmup: int, repeats: int, cuda: bool = False, clock: str = "wall") -> float:
    """Median time of ``run()`` in milliseconds over ``repeats`` calls, after ``warmup`` untimed calls: wall time,
    or with ``clock="thread"`` the calling thread's CPU time (one CPU thread only; on a shared machine it leaves out
    the time other processes hold the core, which a wall clock counts once a call spans a scheduler slice)."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = now()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(now() - t0)
    return 1e3 * statistics.median(times)


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def op_key(name: str, C: int, stride: int, size: int) -> str:
    return f"{name}|C{C}|s{stride}|{size}x{size}"


class LatencyTable:
    """Latencies in ms: ``ops`` by :func:`op_key`, ``fixed`` by deployment; ``meta`` says where they were measured.
    A table built by :meth:`for_target` measures missing entries on first use; a loaded one refuses them."""

    def __init__(self, meta: dict, ops: dict[str, float] | None = None, fixed: dict[str, float] | None = None,
                 measure: bool = False) -> None:
        self.meta, self.ops, self.fixed_parts = meta, dict(ops or {}), dict(fixed or {})
        self.measurable = measure

    @classmethod
    def for_target(cls, target: str = "cpu", threads: int | None = None, batch: int = 1, warmup: int = 5,
                   repeats: int = 30, clock: str = "wall") -> "LatencyTable":
        """An empty table that measures on ``target`` with ``clock`` (see :func:`time_ms`): ``cpu`` (PyTorch with
        ``threads``, default torch's), ``cuda``, or ``onnxruntime`` (each module exported to ONNX as
        ``python -m fastnas.export`` writes it, on ONNX Runtime's CPU provider with ``threads`` intra-op threads)."""
        if target not in TARGETS:
            raise ConfigError(f"latency target must be one of {', '.join(TARGETS)}, got {target!r}")
        if clock not in CLOCKS or (clock == "thread" and (target == "cuda" or threads != 1)):
            raise ConfigError(f"latency clock must be wall, or thread on the cpu with one thread; got {clock!r}")
        if target == "cuda" and not torch.cuda.is_available():
            raise ConfigError("latency target cuda: no CUDA device is present")
        if threads is not None:
            torch.set_num_threads(threads)
        from . import __version__, ops

        meta = {"target": target, "device": torch.cuda.get_device_name() if target == "cuda" else cpu_name(),
                "threads": torch.get_num_threads(), "batch": batch, "warmup": warmup,
                "repeats": repeats, "statistic": "median", "clock": clock,
                "backend": ops.resolve_backend("cuda" if target == "cuda" else "cpu"),
                "versions": {"torch": torch.__version__, "fastnas": __version__, "python": platform.python_version()}}
        if target == "onnxruntime":
            try:
                import onnxruntime
            except ImportError:
                raise ConfigError("latency target onnxruntime needs onnxruntime: pip install fastnas[export]") from None
            meta["versions"]["onnxruntime"] = onnxruntime.__version__
            meta["backend"] = "onnxruntime CPUExecutionProvider"
        return cls(meta, measure=True)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            d = json.loads(Path(path).read_text())
            return cls(d["meta"], d["ops"], d["fixed"])
        except FileNotFoundError:
            raise ConfigError(f"no latency table at {path}") from None
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a latency table ({type(exc).__name__}: {exc})") from None

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "ops": self.ops, "fixed": self.fixed_parts}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    # -- entries ----------------------------------------------------------------------------------------------------
    def _missing(self, what: str) -> ConfigError:
        return ConfigError(f"the latency table ({self.meta.get('target')}, batch {self.meta.get('batch')}) has no "
                           f"entry for {what}: measure a table for this network (python -m fastnas.latency)")

    def module_ms(self, module: torch.nn.Module, shape: tuple[int, ...]) -> float:
        """Measured latency of ``module`` (eval mode) on an input of ``shape`` (the batch prepended)."""
        if self.meta["target"] == "onnxruntime":
            return self._onnxruntime_ms(module, shape)
        cuda = self.meta["target"] == "cuda"
        device = "cuda" if cuda else "cpu"
        from .costmodel import private_rng

        module = module.to(device).eval()
        with private_rng():
            x = torch.randn(self.meta["batch"], *shape, device=device)
        with torch.inference_mode():
            return time_ms(lambda: module(x), self.meta["warmup"], self.meta["repeats"], cuda,
                           self.meta.get("clock", "wall"))

    def _onnxruntime_ms(self, module: torch.nn.Module, shape: tuple[int, ...]) -> float:
        """``module`` exported to ONNX (plain-PyTorch backend, so standard operators only) and timed on ONNX
        Runtime's CPU provider."""
        import io
        import warnings

        import onnxruntime

        from . import ops
        from .costmodel import private_rng

        with private_rng():
            x = torch.randn(self.meta["batch"], *shape)
        f = io.BytesIO()
        with ops.backend("reference"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (x,), f, dynamo=False, input_names=["x"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.meta["threads"]
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(f.getvalue(), options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        return time_ms(lambda: session.run(None, feed), self.meta["warmup"], self.meta["repeats"],
                       clock=self.meta.get("clock", "wall"))

    def op(self, name: str, C: int, stride: int, size: int) -> float:
        """An op's latency in a network: its measured entry times ``op_scale`` (1 until :func:`fit_op_scale`)."""
        return self.meta.get("op_scale", 1.0) * self.raw_op(name, C, stride, size)

    def raw_op(self, name: str, C: int, stride: int, size: int) -> float:
        key = op_key(name, C, stride, size)
        if key not in self.ops:
            if not self.measurable:
                raise self._missing(f"op {key}")
            from .costmodel import private_rng
            from .space import make_op

            with private_rng():
                op = make_op(name, C, stride, True)
            self.ops[key] = self.module_ms(op, (C, size, size))
        return self.ops[key]

    def network_ms(self, net: torch.nn.Module) -> float:
        """Measured latency of a whole network (``net.in_channels``, ``net.input_size``)."""
        return self.module_ms(net, (net.in_channels, net.input_size, net.input_size))

    def fixed(self, model, skeleton: torch.nn.Module, concat: tuple) -> float:
        """Latency of the fixed parts of ``model``'s network (a :class:`fastnas.costmodel.CostModel`) with the cells'
        ``concat`` (normal, reduce): its ``skeleton``'s measured latency less the table's entries of the skeleton's
        ops (max pooling on inputs 0 and 1 of every node)."""
        from .costmodel import FIXED_OP, edge_rows

        key = json.dumps({**model.deployment.to_dict(), "concat": [list(c) for c in concat]}, sort_keys=True)
        if key not in self.fixed_parts:
            if not self.measurable:
                raise self._missing(f"the fixed parts of {key}")
            ops_ms = sum(self.raw_op(FIXED_OP, s.C, 2 if s.reduction else 1, s.input_size if s.reduction else
                                     s.node_size) for s in model.sites for _, j in edge_rows(model.steps) if j < 2)
            # a small network on a noisy machine can measure below its ops' sum: the fixed parts are at least 0
            self.fixed_parts[key] = max(0.0, self.network_ms(skeleton) - ops_ms)
        return self.fixed_parts[key] + self.meta.get("offset_ms", 0.0)


def fit_correction(table: LatencyTable, model, genotypes) -> tuple[float, float]:
    """Fit and set ``table``'s ``offset_ms`` b and ``op_scale`` k by least squares on the measured latency of
    ``genotypes``' whole networks (measured with ``table``'s settings): measured − fixed ≈ b + k · Σ ops.
    ``model``: a :class:`fastnas.costmodel.CostModel` on ``table``, made before the call (its cached tables hold
    the raw entries); costs computed afterwards need a new one. Returns (b, k)."""
    from .costmodel import build

    table.meta.update(op_scale=1.0, offset_ms=0.0)
    xs, ys = [], []
    for g in genotypes:
        xs.append(sum(float(model.table("latency", kind)[r, model.primitives.index(op)])
                      for kind, edges in (("normal", g.normal), ("reduce", g.reduce))
                      for r, (op, _) in zip(gene_rows(edges), edges)))
        ys.append(table.network_ms(build(g, model.deployment))
                  - model.fixed("latency", g.normal_concat, g.reduce_concat))
    k, b = statistics.linear_regression(xs, ys)
    table.meta.update(op_scale=k, offset_ms=b, correction_networks=len(genotypes))
    return b, k


# -- command line ---------------------------------------------------------------------------------------------------
def measure_space(model) -> None:
    """Fill ``model.latency`` (a measuring table) with every op of ``model``'s space at every site, and the fixed
    parts of its network (``model``: a :class:`fastnas.costmodel.CostModel`)."""
    for kind in ("normal", "reduce"):
        model.table("latency", kind)
    model.fixed("latency")


def main(argv=None) -> int:
    """``python -m fastnas.latency``: measure the latency table of a retraining preset's network on this machine."""
    import argparse
    import sys

    from .config import TRAIN_PRESETS
    from .costmodel import CostModel, Deployment
    from .errors import FastNASError
    from .space import resolve_primitives

    p = argparse.ArgumentParser(prog="python -m fastnas.latency", description=main.__doc__)
    p.add_argument("--preset", default="quick", choices=sorted(TRAIN_PRESETS), help="retraining preset's network")
    p.add_argument("--C", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--network", choices=["auto", "cifar", "imagenet"])
    p.add_argument("--num-classes", type=int)
    p.add_argument("--in-channels", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--primitives", default="at-darts", help="space name or comma-separated op names")
    p.add_argument("--target", default="cpu", choices=TARGETS)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall time, or (one CPU thread) the thread's CPU time, for a shared machine")
    p.add_argument("--out", default=TABLE_FILE)
    args = p.parse_args(argv)
    try:
        dep = Deployment.from_preset(args.preset, args.num_classes, args.in_channels, args.image_size, C=args.C,
                                     layers=args.layers, network=args.network)
        table = LatencyTable.for_target(args.target, args.threads, args.batch, repeats=args.repeats,
                                        clock=args.clock)
        table.meta["deployment"] = dep.to_dict()
        measure_space(CostModel(dep, resolve_primitives(args.primitives), latency=table))
    except FastNASError as exc:
        print(f"python -m fastnas.latency: error: {exc}", file=sys.stderr)
        return 2
    table.save(args.out)
    print(f"{len(table.ops)} op entries and the fixed parts of {args.preset} measured on {table.meta['target']} "
          f"({table.meta['threads']} threads, batch {args.batch}): {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
