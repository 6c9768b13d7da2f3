"""No step waits for the device: nothing inside a search or retraining step reads a tensor's value back to the host.

A read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``...) makes the host wait until the device has
run everything queued before it; one per step leaves a GPU idle while the host prepares the next step, and CUDA graphs
cannot capture a step that has one. On this CPU the reads are counted where they are made: ATen's
``_local_scalar_dense`` (behind ``.item()`` and the conversions) and the Python methods that fetch values.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnas.errors import DivergedError
from fastnas.search import Search
from fastnas.train import Trainer
from helpers import tiny_search_config
from test_train import tiny_train_config

_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _loading_data() -> bool:
    """Whether the data loader is running (its augmentations draw on the host, on host tensors: not the step's)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "torch/utils/data/" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class _ScalarReads(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not _loading_data():
            self.counts["aten._local_scalar_dense"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads():
    """Counts of the reads of tensor values made in the block, by kind."""
    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def counting(name):
        def read(self, *args, **kwargs):
            if not _loading_data():
                counts[f"Tensor.{name}"] += 1
            return saved[name](self, *args, **kwargs)
        return read

    try:
        for name in _READS:
            setattr(torch.Tensor, name, counting(name))
        with _ScalarReads(counts):
            yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _batches(loop):
    x, y = next(iter(loop.train_loader))
    return x.to(loop.device), y.to(loop.device)


@pytest.mark.parametrize("settings", [
    dict(order=1), dict(order=2),
    dict(order=1, beta_decay=0.5, alpha_noise=0.3, aux_skip=True),  # collapse controls in both halves
    dict(order=1, budget="params=0.2M"),  # the cost penalty in the architecture loss
], ids=["first-order", "second-order", "collapse-controls", "budget"])
def test_a_search_step_reads_nothing_back(settings):
    search = Search(tiny_search_config(**settings), progress=False)
    search.begin_epoch()
    x, y = _batches(search)
    valid = search._next_valid()
    search._next_valid = lambda: valid  # the loader's own reads (augmentation draws on the host) are not the step's
    search.step(0, x, y)  # warm-up: lazily built state
    with host_reads() as reads:
        search.step(1, x, y)
    assert not reads, dict(reads)


def test_a_retraining_step_reads_nothing_back():
    trainer = Trainer(tiny_train_config(), progress=False)
    trainer.model.train()
    trainer.begin_epoch()
    x, y = _batches(trainer)
    trainer.step(0, x, y)
    with host_reads() as reads:
        trainer.step(1, x, y)
    assert not reads, dict(reads)


@pytest.mark.parametrize("make", [lambda: Search(tiny_search_config(limit=128, batch_size=8, max_steps=None),
                                                 progress=False),
                                  lambda: Trainer(tiny_train_config(limit=128, batch_size=8, max_steps=None),
                                                  progress=False)], ids=["search", "train"])
def test_an_epoch_reads_values_a_fixed_number_of_times_not_once_a_step(make):
    """The loss and accuracy sums and the finiteness checks are read at the end of the epoch (and every half second,
    turned off here), so the reads of an epoch do not grow with its steps."""
    counts = []
    for steps in (2, 5):
        loop = make()
        loop.cfg.max_steps = steps
        loop.watch.every_s = math.inf
        with host_reads() as reads:
            loop.train_epoch()
        counts.append(sum(reads.values()))
    assert counts[0] == counts[1], counts


def test_a_divergence_read_at_the_end_of_the_epoch_names_the_same_step():
    """Read once a step or once an epoch, the pending checks name the same first step that went wrong."""
    messages = []
    for every_s in (0.0, math.inf):
        search = Search(tiny_search_config(arch_lr=1e30, epochs=1, max_steps=3), progress=False)
        search.watch.every_s = every_s
        with pytest.raises(DivergedError, match="architecture weights") as caught:
            search.train_epoch()
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
