"""``--cuda-graphs``: the training step captured once per epoch and replayed on static input buffers.

On the CPU the capture is stood in for by running the step again on the static buffers, which checks everything but
CUDA's recording: the batches reach the step through the buffers, a graph is captured anew each epoch, a batch of
another size runs eagerly, and the numbers are those of the eager run, bit for bit. Where a GPU is present the real
capture is checked against the eager step.
"""
from __future__ import annotations

import pytest
import torch

from fastnas import search as search_cli
from fastnas.cudagraph import GraphedStep, check_supported
from fastnas.errors import ConfigError
from fastnas.search import Search
from fastnas.train import Trainer
from helpers import tiny_search_config
from test_train import tiny_train_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class RunAgain:
    """A CPU stand-in for CUDA graph capture: a replay runs the recorded function again (on the static buffers)."""

    def __init__(self) -> None:
        self.captures = 0

    def warmup(self, fn):
        return fn()

    def capture(self, fn):
        self.captures += 1
        return fn


def _state(loop) -> list[torch.Tensor]:
    return [t.detach().clone() for t in loop.model.state_dict().values()]


def _graphed(loop, capture: RunAgain):
    loop.run_compute = GraphedStep(loop.compute_step, warmup=1, capture=capture)
    return loop


@pytest.mark.parametrize("make", [
    # 72 digits: a weight split of 36 images, batches of 16, 16 and 4 (the last one runs eagerly)
    lambda **kw: Search(tiny_search_config(limit=72, max_steps=None, epochs=3, **kw), progress=False),
    lambda **kw: Search(tiny_search_config(limit=72, max_steps=None, epochs=3, order=2, warmup_epochs=1, **kw),
                        progress=False),
    lambda **kw: Trainer(tiny_train_config(limit=36, max_steps=None, epochs=3, **kw), progress=False),
], ids=["search", "search-second-order-after-warmup", "train"])
def test_replayed_steps_equal_the_eager_ones(make):
    eager = make()
    eager.run()
    capture = RunAgain()
    graphed = _graphed(make(), capture)
    graphed.run()
    assert capture.captures == 3  # one graph an epoch
    for a, b in zip(_state(eager), _state(graphed)):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in eager.history] == [h["train_loss"] for h in graphed.history]


def test_a_graphed_step_reads_its_batch_from_the_static_buffers():
    seen = []
    step = GraphedStep(lambda x: seen.append(x) or x * 2, warmup=0, capture=RunAgain())
    a, b = torch.ones(3), torch.full((3,), 5.0)
    assert torch.equal(step(a), a * 2) and torch.equal(step(b), b * 2)
    assert seen[0] is seen[1] and seen[0] is not b  # the same buffer, refilled
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))  # another shape: eagerly


@pytest.mark.parametrize("device, settings, distributed, message", [
    ("cpu", {}, False, "needs a CUDA device"),
    ("cuda", dict(amp="fp16"), False, "--amp fp16 is refused"),
    ("cuda", {}, True, "one process"),
    ("cuda", dict(compile=True), False, "--compile is refused"),
    ("cuda", dict(alpha_noise=0.3), False, "--alpha-noise is refused"),
    ("cuda", dict(budget="params=1M"), False, "--budget is refused"),
    ("cuda", dict(amp="bf16"), False, None),
])
def test_settings_that_cannot_be_captured_are_refused(device, settings, distributed, message):
    reason = check_supported(torch.device(device), tiny_search_config(**settings), distributed)
    assert (reason is None) if message is None else (message in reason)


def test_cuda_graphs_on_the_cpu_is_one_line_exit_2(capsys, tmp_path):
    assert search_cli.main(["--limit", "64", "--C", "4", "--layers", "3", "--epochs", "1", "--device", "cpu",
                            "--no-progress", "--cuda-graphs", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cuda-graphs needs a CUDA device" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="CUDA device"):
        Search(tiny_search_config(cuda_graphs=True), progress=False)


@needs_cuda
@pytest.mark.parametrize("make", [
    lambda **kw: Search(tiny_search_config(limit=72, max_steps=None, epochs=2, device="cuda", **kw), progress=False),
    lambda **kw: Trainer(tiny_train_config(limit=36, max_steps=None, epochs=2, device="cuda", drop_path_prob=0.0,
                                           **kw), progress=False),
], ids=["search", "train"])
def test_on_a_gpu_the_captured_step_equals_the_eager_one(make):
    eager = make()
    eager.run()
    graphed = make(cuda_graphs=True)
    graphed.run()
    for a, b in zip(_state(eager), _state(graphed)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
