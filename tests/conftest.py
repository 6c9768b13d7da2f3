"""Test configuration: the Triton interpreter must be chosen before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# runs write TensorBoard files only where a test asks (--tensorboard): the others check their run folders' files
os.environ.setdefault("FASTNAS_TENSORBOARD", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _default_backend():
    """Each test starts and ends on the default backend and a fixed seed."""
    import fastnas.ops

    fastnas.ops.set_backend("auto")
    torch.manual_seed(0)
    yield
    fastnas.ops.set_backend("auto")
