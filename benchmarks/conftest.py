"""Benchmark configuration: a fixed number of CPU threads (FASTNAS_BENCH_THREADS, default 2), set before torch works."""
import os

os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("FASTNAS_BENCH_THREADS", "2"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTNAS_BENCH_THREADS", os.environ["OMP_NUM_THREADS"])))
