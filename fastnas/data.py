"""Datasets: the embedded default (scikit-learn's handwritten digits) and CIFAR-10/100 from disk.

The digits ship inside scikit-learn, so a search runs offline on a fresh machine. CIFAR is read from the standard
python-version folders (``cifar-10-batches-py``, ``cifar-100-python``) under ``data_dir``, or downloaded with
``download=True`` where a network is there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2 as T

from .errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS = {
    "digits": DatasetInfo("digits", 1, 10, 8, (0.3074,), (0.3880,)),
    "cifar10": DatasetInfo("cifar10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


class TensorImages(Dataset):
    """Images held in memory as a float tensor [N, C, H, W] in [0, 1], with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


def _digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits, split once and for all: 1,437 train (stratified), 360 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2, random_state=0,
                                           stratify=labels.numpy())
    idx = torch.as_tensor(idx_train if train else idx_test)
    return images[idx], labels[idx]


def transforms_for(info: DatasetInfo, train: bool, cutout: int = 0) -> T.Compose:
    """DARTS's CIFAR transforms (random crop with padding 4, flip, normalise; cutout when asked); for the digits a
    1-pixel random shift (no flips: digits are not mirror-symmetric)."""
    steps = []
    if train:
        if info.name == "digits":
            steps.append(T.RandomCrop(info.image_size, padding=1))
        else:
            steps += [T.RandomCrop(info.image_size, padding=4), T.RandomHorizontalFlip()]
    steps.append(T.Normalize(info.mean, info.std))
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    return T.Compose(steps)


class Cutout(torch.nn.Module):
    """Zero one random square of side ``size`` per image (DeVries and Taylor, 2017), as DARTS does."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        x = x.clone()
        x[..., y0:y1, x0:x1] = 0
        return x


def _cifar(info: DatasetInfo, data_dir: str | Path | None, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    if data_dir is None:
        raise DataError(f"{info.name} is read from disk: pass --data-dir DIR (holding the python-version folder), "
                        f"and --download to fetch it there when a network is available")
    root = Path(data_dir).expanduser()
    cls, folder = ((torchvision.datasets.CIFAR10, "cifar-10-batches-py") if info.name == "cifar10"
                   else (torchvision.datasets.CIFAR100, "cifar-100-python"))
    if not download and not (root / folder).is_dir():
        raise DataError(f"{info.name} not found: expected the folder {root / folder} "
                        f"(the python version of the dataset); pass --download to fetch it when a network is available")
    try:
        ds = cls(str(root), train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError for corrupt files and URLError offline
        raise DataError(f"could not read {info.name} from {root}: {exc}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255.0)
    return images, torch.tensor(ds.targets, dtype=torch.long)


def load_split(name: str, train: bool, data_dir: str | Path | None = None, download: bool = False,
               augment: bool = False, cutout: int = 0, limit: int | None = None) -> TensorImages:
    """The train or test split of ``name`` with DARTS's transforms; ``limit`` keeps the first N images."""
    info = dataset_info(name)
    images, labels = _digits(train) if name == "digits" else _cifar(info, data_dir, train, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorImages(images, labels, transforms_for(info, augment, cutout))


class EpochShuffle(Sampler[int]):
    """A permutation of ``indices`` that depends only on (seed, epoch): an interrupted run resumes the same order."""

    def __init__(self, indices: list[int], seed: int) -> None:
        self.indices, self.seed, self.epoch = list(indices), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()])

    def __len__(self) -> int:
        return len(self.indices)


def shard_sampler(indices, seed: int, rank: int = 0, world_size: int = 1) -> Sampler[int]:
    """Shuffled each epoch from (seed, epoch) alone. With ``world_size`` > 1, rank ``rank``'s shard of the same
    shuffle (a ``DistributedSampler`` drawing :class:`EpochShuffle`'s permutation: rank r takes its positions r,
    r + world_size, ...; every rank gets as many samples, the first few repeated when the split does not divide
    evenly)."""
    if world_size == 1:
        return EpochShuffle(list(indices), seed)
    inner = DistributedSampler(range(len(indices)), world_size, rank, shuffle=True, seed=seed * 100003,
                               drop_last=False)
    return _SubsetSampler(list(indices), inner)


class _SubsetSampler(Sampler[int]):
    """Positions drawn by ``inner`` mapped to ``indices``, with ``set_epoch`` passed through."""

    def __init__(self, indices: list[int], inner: DistributedSampler) -> None:
        self.indices, self.inner = indices, inner

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return iter([self.indices[i] for i in self.inner])

    def __len__(self) -> int:
        return len(self.inner)


def search_loaders(name: str, batch_size: int, train_portion: float = 0.5, data_dir=None, download: bool = False,
                   seed: int = 0, workers: int = 0, limit: int | None = None, rank: int = 0, world_size: int = 1):
    """DARTS's search split: the first ``train_portion`` of the training set trains the weights, the rest the
    architecture. Returns (weight loader, architecture loader, info). With ``world_size`` > 1 each loader yields
    rank ``rank``'s shard of its split (``batch_size`` images a batch on every rank)."""
    if not 0.0 < train_portion < 1.0:
        raise DataError(f"train_portion must be strictly between 0 and 1, got {train_portion}")
    data = load_split(name, train=True, data_dir=data_dir, download=download, augment=True, limit=limit)
    split = int(len(data) * train_portion)
    if split < 1 or split >= len(data):
        raise DataError(f"{len(data)} training images cannot be split with train_portion {train_portion}")
    loaders = []
    for part, indices in enumerate((range(split), range(split, len(data)))):
        sampler = shard_sampler(indices, seed + part, rank, world_size)
        loaders.append(DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                  drop_last=False, persistent_workers=workers > 0))
    return loaders[0], loaders[1], dataset_info(name)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch it is (both our samplers and DistributedSampler know set_epoch)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
