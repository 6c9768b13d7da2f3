"""Benchmark configuration: a fixed number of CPU threads (FASTNAS_BENCH_THREADS, default 2), set before torch works,
glibc's heap kept (:mod:`benchmarks.allocator`), and the devices' copy bandwidth (the roofline's denominator) and
the allocator regime in pytest-benchmark's ``machine_info``."""
import os

from benchmarks import allocator

allocator.keep_heap()

os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("FASTNAS_BENCH_THREADS", "2"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTNAS_BENCH_THREADS", os.environ["OMP_NUM_THREADS"])))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Copy bandwidth per device (bytes/s), threads and versions, stored with the results in the JSON."""
    from benchmarks.roofline import copy_bandwidth

    disabled = config.getoption("benchmark_disable", False)
    machine_info["fastnas"] = {
        "threads": torch.get_num_threads(),
        "malloc": allocator.regime,
        "torch": torch.__version__,
        "copy_bandwidth": {} if disabled else {"cpu": copy_bandwidth("cpu")},
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available() and not disabled:
        machine_info["fastnas"]["copy_bandwidth"]["cuda"] = copy_bandwidth("cuda")
    try:
        import triton

        machine_info["fastnas"]["triton"] = triton.__version__
    except ImportError:
        pass
