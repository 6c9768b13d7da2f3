"""Turn pytest-benchmark's JSON into a Markdown table and a PNG plot.

    python -m benchmarks.report benchmarks/out/cpu.json --out DIR   # writes DIR/table.md and DIR/plot.png

DIR defaults to ``benchmarks/out`` (ignored by git, like the raw JSON); the published table and plot live in
``benchmarks/results/``.

Tables (times are medians):
- ops: one row per op, mode, shape and dtype; per provider the time, then for each fused provider (anything but
  ``reference``) its speed-up over the eager reference and over ``reference_compiled`` (same device only) and its
  fraction of the memory-bound floor (the measured time of a copy moving the bytes the op must move, divided by the
  op's time: 100% = at the floor; older JSON without ``floor_s``: bytes / streaming copy bandwidth);
- side by side: the interleaved "targets" cases (min and median of each provider from the same rounds);
- steps: per step kind and provider, time, time relative to the eager reference and peak memory relative to the eager
  reference with DARTS's memory (``reference_darts``) and to ``reference``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

SHAPE_NAMES = {(64, 16, 32, 32): "s1", (64, 32, 16, 16): "s2", (64, 64, 8, 8): "s3"}
OP_ORDER = ["mixed_sum", "channel_pool", "channel_scale", "spatial_pool", "spatial_scale", "channel_gate",
            "spatial_gate"]
PROVIDER_ORDER = ["reference", "reference_compiled", "cpu", "cpu_compiled", "cuda", "triton"]
STEP_ORDER = ["reference_darts", "reference", "cpu", "cpu_pc4", "cuda", "cuda_pc4", "triton",
              "reference_darts_compiled", "reference_compiled", "cpu_compiled", "cpu_pc4_compiled", "cuda_compiled",
              "triton_compiled"]


def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def _x(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.2f}×"


def _pct(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.0f}%"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _bandwidth(data: dict) -> dict:
    return (data.get("machine_info", {}).get("fastnas", {}) or {}).get("copy_bandwidth", {}) or {}


def op_rows(data: dict) -> dict:
    """{(op, mode, shape, dtype): {provider: {"time", "bytes", "device"}}} of the per-provider op benchmarks."""
    cases: dict = defaultdict(dict)
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if e.get("mode") not in ("fwd", "fwdbwd") or "providers" in e or "op" not in e:
            continue
        key = (e["op"], e["mode"], tuple(e["shape"]), e["dtype"])
        cases[key][e["provider"]] = {"time": b["stats"]["median"], "bytes": e.get("bytes"), "device": e.get("device"),
                                      "floor": e.get("floor_s")}
    return cases


def _case_sort(key):
    op, mode, shape, dtype = key
    return (OP_ORDER.index(op) if op in OP_ORDER else 99, mode, SHAPE_NAMES.get(shape, str(shape)), dtype)


def _speedup(results: dict, base: str, p: str) -> float | None:
    b, r = results.get(base), results[p]
    if b is None or b.get("device") != r.get("device"):
        return None
    return b["time"] / r["time"]


def _floor_fraction(r: dict | None, bw: dict) -> float | None:
    """Floor time / measured time: the floor is a measured copy of the same bytes (``floor_s``), or else the bytes over
    the device's streaming copy bandwidth."""
    if not r:
        return None
    if r.get("floor"):
        return r["floor"] / r["time"]
    dev_bw = bw.get(r.get("device"))
    return r["bytes"] / dev_bw / r["time"] if r.get("bytes") and dev_bw else None


def ops_table(data: dict) -> str:
    cases = op_rows(data)
    if not cases:
        return ""
    bw = _bandwidth(data)
    present = [p for p in PROVIDER_ORDER if any(p in c for c in cases.values())]
    present += sorted({p for c in cases.values() for p in c} - set(present))
    fused = [p for p in present if p != "reference"]
    head = ["op", "mode", "shape", "dtype"] + [f"{p}" for p in present]
    for p in fused:
        head += [f"{p} vs ref", f"{p} vs compiled ref"] if p != "reference_compiled" else [f"{p} vs ref"]
    head += [f"{p} of floor" for p in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cases, key=_case_sort):
        op, mode, shape, dtype = key
        res = cases[key]
        row = [op, "fwd+bwd" if mode == "fwdbwd" else mode,
               f"{SHAPE_NAMES.get(shape, '')} {shape[1]}@{shape[2]}x{shape[3]}", dtype]
        row += [_fmt_time(res[p]["time"]) if p in res else "—" for p in present]
        for p in fused:
            row.append(_x(_speedup(res, "reference", p)) if p in res else "—")
            if p != "reference_compiled":
                row.append(_x(_speedup(res, "reference_compiled", p)) if p in res else "—")
        for p in present:
            row.append(_pct(_floor_fraction(res.get(p), bw)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def side_by_side_table(data: dict) -> str:
    rows = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if not b.get("group", "").startswith("targets-") or "providers" not in e:
            continue
        def cells(st: dict) -> str:
            return "; ".join(f"{p} {v['min_ms']:.2f}/{v['median_ms']:.2f} ms" for p, v in st.items())

        warm = e.get("providers_warm")
        layout = "channels_last" if e.get("layout") == "cl" else "NCHW"
        rows.append(f"| {e['op']} fwd+bwd s1 fp32 {layout} | {cells(e['providers'])} | "
                    f"{_x(e.get('speedup_vs_reference_median'))} | {_x(e.get('speedup_vs_reference_compiled_median'))} | "
                    f"{cells(warm) if warm else '—'} | {_x(e.get('speedup_vs_reference_warm_median'))} | "
                    f"{_x(e.get('speedup_vs_reference_compiled_warm_median'))} | "
                    f"≥ {e.get('target_speedup_vs_reference')}× |")
    if not rows:
        return ""
    return "\n".join(["| case | cold: min/median per provider (interleaved calls) | cpu vs ref | cpu vs compiled ref | "
                      "warm: min/median (interleaved blocks) | cpu vs ref | cpu vs compiled ref | target |",
                      "|---|---|---|---|---|---|---|---|", *rows])


def step_results(data: dict) -> list[dict]:
    return [b["extra_info"] for b in data.get("benchmarks", [])
            if b.get("group", "").startswith("step-") and "providers" in b.get("extra_info", {})]


def steps_table(data: dict) -> str:
    rows = []
    for e in step_results(data):
        st = e["providers"]
        order = [p for p in STEP_ORDER if p in st] + sorted(set(st) - set(STEP_ORDER))
        for p in order:
            s = st[p]
            t_ref = e.get("time_vs_reference", {}).get(p)
            t_cref = e.get("time_vs_reference_compiled", {}).get(p)
            m_darts = e.get("memory_vs_reference_darts", {}).get(p)
            m_ref = e.get("memory_vs_reference", {}).get(p)
            peak = f"{s['peak_mib']:.0f}" if "peak_mib" in s else "—"
            rows.append(f"| {e['kind']} | {p} | {_fmt_time(s['min_s'])} | {_fmt_time(s['median_s'])} | "
                        f"{_x(t_ref)} | {_x(t_cref)} | {peak} | {_x(m_darts)} | {_x(m_ref)} |")
    if not rows:
        return ""
    descr = "\n".join(f"- {e['kind']}: {e['description']}, {e['threads']} threads" for e in step_results(data))
    return "\n".join([descr, "", "| step | provider | min | median | time vs reference | time vs compiled ref | "
                      "peak MiB | memory vs reference_darts | memory vs reference |",
                      "|---|---|---|---|---|---|---|---|---|", *rows])


def markdown(data: dict, source: str = "") -> str:
    mi = data.get("machine_info", {})
    fx = mi.get("fastnas", {}) or {}
    bw = ", ".join(f"{d} {v / 1e9:.1f} GB/s" for d, v in _bandwidth(data).items()) or "not measured"
    parts = [f"# fastnas benchmarks",
             "",
             f"{data.get('datetime', '')[:10]}; {mi.get('cpu', {}).get('brand_raw', mi.get('processor', ''))}"
             f"{'; ' + fx['cuda_device'] if fx.get('cuda_device') else ''}; torch {fx.get('torch', '?')}; "
             f"{fx.get('threads', '?')} threads; copy bandwidth {bw}."
             + (f" Source: `{os.path.basename(source)}`." if source else ""),
             "",
             "Times are medians. *vs ref*: speed-up over the eager PyTorch reference; *vs compiled ref*: over "
             "torch.compile of it (same device only). *of floor*: time of a copy moving the bytes the op must move "
             "(same size, so same cache level) / time of the op; 100% = at the memory-bound floor."]
    for title, table in (("Ops and attention gates", ops_table(data)),
                         ("Side by side (interleaved rounds)", side_by_side_table(data)),
                         ("Whole steps (interleaved rounds; peak memory of each provider alone in a fresh process)",
                          steps_table(data))):
        if table:
            parts += ["", f"## {title}", "", table]
    return "\n".join(parts) + "\n"


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = op_rows(data)
    bw = _bandwidth(data)
    keys = [k for k in sorted(cases, key=_case_sort) if k[1] == "fwdbwd" and k[3] == "fp32"]
    fused = [p for p in PROVIDER_ORDER if p != "reference" and any(p in cases[k] for k in keys)]
    steps = step_results(data)
    fig, axes = plt.subplots(3, 1, figsize=(13, 12))
    labels = [f"{k[0].replace('_', ' ')} {SHAPE_NAMES.get(k[2], '')}" for k in keys]
    width = 0.8 / max(1, len(fused))
    for ax, what in ((axes[0], "speedup"), (axes[1], "floor")):
        provs = fused if what == "speedup" else ["reference"] + fused
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            vals = []
            for k in keys:
                r = cases[k].get(p)
                if what == "speedup":
                    v = _speedup(cases[k], "reference", p) if r else None
                else:
                    v = _floor_fraction(r, bw)
                vals.append(v if v is not None else float("nan"))
            ax.bar([j + (i - (len(provs) - 1) / 2) * width for j in range(len(keys))], vals, width, label=p)
        ax.set_xticks(range(len(keys)), labels, fontsize=7, rotation=40, ha="right")
        if what == "speedup":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("speed-up vs eager reference")
            ax.set_title("Ops and gates, forward+backward, fp32 (median)")
        else:
            ax.set_ylabel("fraction of memory-bound floor")
            ax.set_title("Fraction of the memory-bound floor (time of a copy of the same bytes / time)")
        ax.legend(fontsize=8)
    ax = axes[2]
    if steps:
        provs = [p for p in STEP_ORDER if any(p in e["providers"] for e in steps)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            t = [e.get("time_vs_reference", {}).get(p, float("nan")) for e in steps]
            m = [e.get("memory_vs_reference_darts", e.get("memory_vs_reference", {})).get(p, float("nan"))
                 for e in steps]
            xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(steps))]
            bars = ax.bar(xs, t, width, label=p)
            ax.scatter(xs, m, marker="_", s=200, linewidths=3, color="k")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(steps)), [e["kind"] for e in steps])
        ax.set_ylabel("time vs eager reference (bars)\npeak memory vs reference_darts,\nelse vs reference (ticks)")
        ax.set_title("Whole steps")
        ax.legend(fontsize=8, ncol=4)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON -> table.md + plot.png")
    parser.add_argument("json", nargs="+", help="one or more --benchmark-json files (benchmarks are merged)")
    parser.add_argument("--out", default="benchmarks/out", help="output folder")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    data = load(args.json[0])
    for extra in args.json[1:]:
        data.setdefault("benchmarks", []).extend(load(extra).get("benchmarks", []))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown(data, args.json[0]))
    if not args.no_plot:
        plot(data, os.path.join(args.out, "plot.png"))
    print(f"wrote {os.path.join(args.out, 'table.md')}" + ("" if args.no_plot else " and plot.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
