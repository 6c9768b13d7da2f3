"""The benchmark suite still works (no timing): a tiny subset of ``pytest benchmarks/`` with --benchmark-disable, the
memory measurement of one tiny step in a fresh process, and the report on a small JSON fixture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"FASTNAS_BENCH_STEP_BATCH": "2", "FASTNAS_BENCH_RETRAIN_C": "8", "FASTNAS_BENCH_RETRAIN_LAYERS": "2",
        "FASTNAS_BENCH_THREADS": "1"}


def _env(**extra):
    env = dict(os.environ, **TINY, **extra)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_benchmarks_run_disabled():
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
           "-k", "(mixed_sum and fwdbwd and s3 and fp32 and not compiled) or (spatial_gate and fwd- and s3 "
           "and fp32 and reference-) or retrain"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(FASTNAS_BENCH_STEP_PROVIDERS="reference,cpu"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout


def test_step_memory_in_fresh_process():
    cmd = [sys.executable, "-m", "benchmarks.steps", "memory", "--kind", "retrain", "--provider", "reference",
           "--threads", "1"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["peak_mib"] > 0 and out["maxrss_mib"] > 0 and out["provider"] == "reference"


def _bench(provider, op, mode, median, bytes_, floor, group):
    return {"group": group, "name": f"test_bench[{provider}-{op}]", "stats": {"median": median, "min": median},
            "extra_info": {"provider": provider, "op": op, "mode": mode, "shape": [64, 16, 32, 32], "dtype": "fp32",
                           "device": "cpu", "bytes": bytes_, "floor_s": floor}}


def test_report_on_fixture(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import report

    step = {"group": "step-search1", "name": "test_step[search1]", "stats": {"median": 1.0, "min": 1.0},
            "extra_info": {"kind": "search1", "description": "first-order search step", "threads": 2,
                           "providers": {"reference_darts": {"min_s": 2.0, "median_s": 2.2, "peak_mib": 1000.0},
                                         "reference": {"min_s": 2.1, "median_s": 2.3, "peak_mib": 700.0},
                                         "cpu": {"min_s": 1.5, "median_s": 1.6, "peak_mib": 500.0}},
                           "time_vs_reference": {"reference_darts": 0.96, "reference": 1.0, "cpu": 0.7},
                           "memory_vs_reference_darts": {"reference_darts": 1.0, "reference": 0.7, "cpu": 0.5}}}
    data = {"datetime": "2026-11-28T10:00:00", "machine_info": {"cpu": {"brand_raw": "test cpu"},
            "fastnas": {"threads": 2, "torch": "x", "copy_bandwidth": {"cpu": 2e10}}},
            "benchmarks": [_bench("reference", "mixed_sum", "fwdbwd", 4e-3, 10**7, 1e-3, "g"),
                           _bench("reference_compiled", "mixed_sum", "fwdbwd", 2e-3, 10**7, 1e-3, "g"),
                           _bench("cpu", "mixed_sum", "fwdbwd", 1e-3, 10**7, 1e-3, "g"), step]}
    src = tmp_path / "r.json"
    src.write_text(json.dumps(data))
    assert report.main([str(src), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| mixed_sum | fwd+bwd | s1 16@32x32 | fp32 | 4.00 ms | 2.00 ms | 1.00 ms |" in table
    assert "4.00×" in table and "2.00×" in table and "100%" in table  # cpu vs ref, vs compiled ref, of floor
    assert "| search1 | cpu | 1.50 s | 1.60 s | 0.70× |" in table and "| 500 | 0.50× |" in table
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000


def test_data_loading_benchmark_reads_a_generated_folder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.data_loading import loader_throughput, make_folder

    root = make_folder(tmp_path / "images", images=12, classes=3, size=8)
    assert sorted(p.name for p in root.iterdir()) == ["class0", "class1", "class2"]
    assert loader_throughput(root, size=8, batch=4, workers=0, passes=1) > 0
