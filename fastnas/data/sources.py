"""The built-in datasets: scikit-learn's handwritten digits (embedded, offline) and CIFAR-10/100 read from their
python-version folders (or downloaded), held in memory."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .transforms import transforms_for


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()  # names in label order (CIFAR-100's are read with the data)
    # an image folder's images per class in each part: {"train": {class: n}, "held_out": {class: n}}
    images: dict[str, dict[str, int]] | None = dataclasses.field(default=None, compare=False, hash=False)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS = {
    "digits": DatasetInfo("digits", 1, 10, 8, (0.3074,), (0.3880,), tuple(str(d) for d in range(10))),
    "cifar10": DatasetInfo("cifar10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DATASET_NAMES = (*DATASETS, "folder")


def dataset_info(name: str) -> DatasetInfo:
    """The fixed description of a built-in dataset (a folder's depends on its contents: see :func:`open_folder`)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


class TensorImages(Dataset):
    """Images held in memory as a float tensor [N, C, H, W] in [0, 1], with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None,
                 info: DatasetInfo | None = None) -> None:
        self.images, self.labels, self.transform, self.info = images, labels, transform, info

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


def _cifar(info: DatasetInfo, data_dir: str | Path | None, train: bool,
           download: bool) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
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
    return images, torch.tensor(ds.targets, dtype=torch.long), dataclasses.replace(info, classes=tuple(ds.classes))


def load_split(name: str, train: bool, data_dir: str | Path | None = None, download: bool = False,
               augment: bool = False, cutout: int = 0, limit: int | None = None) -> TensorImages:
    """The train or test split of ``name`` with DARTS's transforms; ``limit`` keeps the first N images."""
    info = dataset_info(name)
    if name == "digits":
        images, labels = _digits(train)
    else:
        images, labels, info = _cifar(info, data_dir, train, download)
    return TensorImages(images[:limit], labels[:limit], transforms_for(info, augment, cutout), info)
