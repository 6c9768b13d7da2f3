"""Samplers and loaders whose order and random draws depend on (seed, epoch, sample) alone, so that a resumed run
reads and augments what the uninterrupted one did, in one process or sharded over several.

The training sampler is ours rather than ``RandomSampler(generator=...)``: it yields (index, seed) pairs, each
sample with its own augmentation seed (:class:`SeededDraws`), and its permutation is a function of (seed, epoch)
through ``set_epoch``; RandomSampler has neither, and its generator's state would have to be checkpointed. Sharding
is torch's ``DistributedSampler``."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class EpochShuffle(Sampler[tuple[int, int]]):
    """A permutation of ``indices`` that depends only on (seed, epoch): an interrupted run resumes the same order.
    Yields (index, seed) pairs: each sample's own seed for its random augmentation (:class:`SeededDraws`). With
    ``world_size`` > 1, rank ``rank``'s shard of the same permutation (torch's ``DistributedSampler``), each sample
    with the seed it has in a single process."""

    def __init__(self, indices, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(indices)
        self.inner = DistributedSampler(range(len(self.indices)), world_size, rank, shuffle=True,
                                        seed=seed * 100003, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.inner.seed + self.inner.epoch)  # the inner sampler's generator
        torch.randperm(len(self.indices), generator=g)  # its permutation: the seeds are the draws after it
        seeds = torch.randint(0, 2 ** 62, (len(self.indices),), generator=g).tolist()
        return iter([(self.indices[i], seeds[i]) for i in self.inner])

    def __len__(self) -> int:
        return len(self.inner)


class SeededDraws(Dataset):
    """``dataset`` read by (index, seed) pairs: each sample is transformed with torch's CPU generator seeded by its
    own seed (the generator's state is put back after). Its augmentation then depends on (run seed, epoch, sample)
    alone, not on which process reads it: a resumed run, whose workers start afresh, draws what the uninterrupted
    run drew, whatever the number of workers."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


def seeded_loader(data: Dataset, batch_size: int, sampler: Sampler, workers: int,
                  pin_memory: bool = False) -> DataLoader:
    """A training loader over ``data`` with an (index, seed) ``sampler`` (:class:`EpochShuffle`) and persistent
    workers (:func:`ordered_loader`)."""
    return ordered_loader(SeededDraws(data), batch_size, workers, pin_memory, sampler)


def ordered_loader(data: Dataset, batch_size: int, workers: int, pin_memory: bool = False,
                   sampler: Sampler | None = None) -> DataLoader:
    """A test loader: ``data`` in order (or as ``sampler`` draws it) and persistent workers. Its own generator
    feeds DataLoader's worker seeds, which would otherwise be drawn from the global stream when the first epoch
    starts: a run resumed in a later epoch would draw them at another point of that stream than the uninterrupted
    run, and its main-process randomness (drop path) would differ."""
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


def loader_workers(name: str, workers: int | None) -> int:
    """``workers``, or by default: none for the in-memory datasets (their transforms cost less than a worker's
    hand-off), and for a folder (decoding images) one per core but one, at most 4."""
    if workers is not None:
        return workers
    if name != "folder":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 1))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch it is (both our samplers and DistributedSampler know set_epoch)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
