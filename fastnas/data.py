"""Datasets: the embedded default (scikit-learn's handwritten digits), CIFAR-10/100 from disk, and the user's own
image folders.

The digits ship inside scikit-learn, so a search runs offline on a fresh machine. CIFAR is read from the standard
python-version folders (``cifar-10-batches-py``, ``cifar-100-python``) under ``data_dir``, or downloaded with
``download=True`` where a network is there. An image folder has torchvision's ``ImageFolder`` layout (see
:func:`open_folder`). Every run writes ``data.json`` (:func:`write_data_json`): the class names, input channels, image
side and normalisation that everything downstream of the run uses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2 as T

from .errors import DataError
from .runtime import log


@dataclass(frozen=True)
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
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorImages(images, labels, transforms_for(info, augment, cutout), info)


def _sample_seeds(g: torch.Generator, n: int) -> list[int]:
    """``n`` seeds for the random draws of one epoch's samples, the next ones of ``g``."""
    return torch.randint(0, 2 ** 62, (n,), generator=g).tolist()


class EpochShuffle(Sampler[tuple[int, int]]):
    """A permutation of ``indices`` that depends only on (seed, epoch): an interrupted run resumes the same order.
    Yields (index, seed) pairs: each sample's own seed for its random augmentation (:class:`SeededDraws`)."""

    def __init__(self, indices: list[int], seed: int) -> None:
        self.indices, self.seed, self.epoch = list(indices), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.indices), generator=g).tolist()
        seeds = _sample_seeds(g, len(self.indices))
        return iter([(self.indices[i], seeds[i]) for i in order])

    def __len__(self) -> int:
        return len(self.indices)


def shard_sampler(indices, seed: int, rank: int = 0, world_size: int = 1) -> Sampler[tuple[int, int]]:
    """Shuffled each epoch from (seed, epoch) alone, as (index, seed) pairs for :class:`SeededDraws`. With
    ``world_size`` > 1, rank ``rank``'s shard of the same shuffle (a ``DistributedSampler`` drawing
    :class:`EpochShuffle`'s permutation: rank r takes its positions r, r + world_size, ...; every rank gets as many
    samples, the first few repeated when the split does not divide evenly), each sample with the seed it has in a
    single process."""
    if world_size == 1:
        return EpochShuffle(list(indices), seed)
    inner = DistributedSampler(range(len(indices)), world_size, rank, shuffle=True, seed=seed * 100003,
                               drop_last=False)
    return _SubsetSampler(list(indices), inner)


class _SubsetSampler(Sampler[tuple[int, int]]):
    """Positions drawn by ``inner`` mapped to (index, seed) pairs of ``indices``, with ``set_epoch`` passed
    through."""

    def __init__(self, indices: list[int], inner: DistributedSampler) -> None:
        self.indices, self.inner = indices, inner

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.inner.seed + self.inner.epoch)  # EpochShuffle's generator
        torch.randperm(len(self.indices), generator=g)
        seeds = _sample_seeds(g, len(self.indices))
        return iter([(self.indices[i], seeds[i]) for i in self.inner])

    def __len__(self) -> int:
        return len(self.inner)


class SeededDraws(Dataset):
    """``dataset`` read by (index, seed) pairs: each sample is transformed with torch's CPU generator seeded by its
    own seed (the generator's state is put back after). A sample's random augmentation then depends on (run seed,
    epoch, sample) alone, not on which process reads it (the main one or a worker) nor on what that process drew
    before; so a resumed run, whose workers start afresh, draws what the uninterrupted run drew, and the number of
    workers does not change the numbers."""

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
    """A training loader over ``data`` with an (index, seed) ``sampler`` (:func:`shard_sampler`) and persistent
    workers. Its own generator feeds DataLoader's worker seeds, which would otherwise be drawn from the global
    generator when the first epoch starts: a run resumed in a later epoch would then draw at another point of
    the stream than the uninterrupted run, and its main-process randomness (drop path) would differ."""
    return DataLoader(SeededDraws(data), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=False, persistent_workers=workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))


def ordered_loader(data: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """A test loader: ``data`` in order, persistent workers, and (as :func:`seeded_loader`) its own generator for
    the worker seeds, so that starting its workers leaves the global random stream alone."""
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


def search_loaders(name: str, batch_size: int, train_portion: float = 0.5, data_dir=None, download: bool = False,
                   seed: int = 0, workers: int | None = 0, limit: int | None = None, rank: int = 0,
                   world_size: int = 1, image_size: int | None = None, skip_bad_images: bool = False,
                   pin_memory: bool = False):
    """DARTS's search split: the first ``train_portion`` of the training set trains the weights, the rest the
    architecture (a folder's held-out images are not used). Returns (weight loader, architecture loader, info). With
    ``world_size`` > 1 each loader yields rank ``rank``'s shard of its split (``batch_size`` images a batch on every
    rank)."""
    if not 0.0 < train_portion < 1.0:
        raise DataError(f"train_portion must be strictly between 0 and 1, got {train_portion}")
    workers = loader_workers(name, workers)
    if name == "folder":
        parts = open_folder(data_dir, image_size, skip_bad_images, workers)
        data = _folder_dataset(parts, parts.train, train=True, limit=limit)
    else:
        check_native_size(name, image_size)
        data = load_split(name, train=True, data_dir=data_dir, download=download, augment=True, limit=limit)
    split = int(len(data) * train_portion)
    if split < 1 or split >= len(data):
        raise DataError(f"{len(data)} training images cannot be split with train_portion {train_portion}")
    loaders = []
    for part, indices in enumerate((range(split), range(split, len(data)))):
        sampler = shard_sampler(indices, seed + part, rank, world_size)
        loaders.append(seeded_loader(data, batch_size, sampler, workers, pin_memory))
    return loaders[0], loaders[1], data.info


def train_test_data(name: str, data_dir=None, download: bool = False, cutout: int = 0, limit: int | None = None,
                    image_size: int | None = None, skip_bad_images: bool = False, workers: int = 0):
    """The augmented training split and the test split (a folder's held-out part) for retraining.
    Returns (train data, test data, info)."""
    if name == "folder":
        parts = open_folder(data_dir, image_size, skip_bad_images, workers)
        if not parts.val:
            raise DataError(f"{data_dir} leaves no images to test on: give each class at least 2 images "
                            f"(or a val/ folder)")
        return (_folder_dataset(parts, parts.train, train=True, cutout=cutout, limit=limit),
                _folder_dataset(parts, parts.val, train=False), parts.info)
    check_native_size(name, image_size)
    train = load_split(name, train=True, data_dir=data_dir, download=download, augment=True, cutout=cutout,
                       limit=limit)
    return train, load_split(name, train=False, data_dir=data_dir, download=download), train.info


def _folder_dataset(parts: FolderParts, samples: list, train: bool, cutout: int = 0,
                    limit: int | None = None) -> FolderImages:
    record = data_record(parts.info)
    transform = train_transform(record, cutout) if train else eval_transform(record)
    return FolderImages(samples[:limit] if limit is not None else samples, transform, parts.info)


def loader_workers(name: str, workers: int | None) -> int:
    """``workers``, or by default: none for the in-memory datasets (their transforms cost less than a worker's
    hand-off), and for a folder (decoding images) one per core but one, at most 4."""
    if workers is not None:
        return workers
    if name != "folder":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 1))


def image_side(name: str, image_size: int | None) -> int:
    """The network's input side for ``name``: ``image_size`` for a folder (default :data:`FOLDER_IMAGE_SIZE`), the
    dataset's own side otherwise."""
    if name == "folder":
        return image_size or FOLDER_IMAGE_SIZE
    return dataset_info(name).image_size


def check_native_size(name: str, image_size: int | None) -> None:
    """Refuse ``--image-size`` for a built-in dataset unless it is the dataset's own side."""
    native = dataset_info(name).image_size
    if image_size is not None and image_size != native:
        raise DataError(f"--image-size applies to --dataset folder; {name} images are {native}x{native}")


def check_image_size(name: str, image_size: int | None, layers: int) -> None:
    """Refuse, before any image is read, an input side too small for the network's reductions (for a folder a
    DataError that says which --image-size would do)."""
    from .errors import ConfigError
    from .supernet import check_input_size, reduction_layers

    side = image_side(name, image_size)
    try:
        check_input_size(side, side, layers)
    except ConfigError as exc:
        if name != "folder":
            raise
        need = 2 ** len(reduction_layers(layers))
        raise DataError(f"--image-size {side}: {exc}; pass --image-size {need} or more") from None


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch it is (both our samplers and DistributedSampler know set_epoch)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


# -- image folders --------------------------------------------------------------------------------------------------
FOLDER_IMAGE_SIZE = 32  # the network's input side for a folder when --image-size is not given
VAL_FRACTION = 0.2  # a folder without val/: this share of each class is held out, by a fixed seed
SPLIT_SEED = 0  # fixed, so that searches and retrainings with any --seed hold out the same images
STATS_SAMPLE = 2000  # normalisation statistics come from at most this many training images (seeded sample)
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}  # PIL modes of 16-bit, 32-bit and float gray
_GRAY_MODES = {"1", "L", "LA"} | _HIGH_BIT_MODES  # PIL modes of single-channel images


def high_bit_range(image) -> float:
    """The value that stands for white in a high-bit-depth gray image: 65535 for 16-bit modes and for 32-bit
    integer images whose values fit in 16 bits (Pillow reads some 16-bit files as mode ``I``), 2^31 - 1 for other
    32-bit ones, 1 for float images."""
    if image.mode == "F":
        return 1.0
    if image.mode != "I":
        return 65535.0
    low, high = image.getextrema()
    return 65535.0 if low >= 0 and high <= 65535 else 2.0 ** 31 - 1


def scaled_gray(image):
    """A high-bit-depth gray PIL image as a float (mode ``F``) image in [0, 1], scaled by :func:`high_bit_range`
    (PIL's own conversion to 8 bits clips instead: most of a 16-bit image would turn white)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64) / high_bit_range(image)
    return Image.fromarray(np.clip(pixels, 0.0, 1.0).astype(np.float32), "F")


class ConvertMode:
    """A PIL image converted to ``mode`` (``"RGB"`` or ``"L"``); palette images through RGBA, so that a palette's
    transparency is read as PIL means it; high-bit-depth gray images scaled to [0, 1] by their range
    (:func:`scaled_gray`), kept at full precision (a float image) for ``"L"``. Tensors pass through unchanged."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        from PIL import Image

        if not isinstance(image, Image.Image) or image.mode == self.mode:
            return image
        if image.mode in _HIGH_BIT_MODES:
            image = scaled_gray(image)
            if self.mode == "L":
                return image
            image = image.point(lambda v: v * 255.0).convert("L")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def _to_float(info: dict[str, Any]) -> list:
    """PIL image of the dataset's mode -> float tensor in [0, 1]."""
    return [ConvertMode("L" if info["in_channels"] == 1 else "RGB"), T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def eval_transform(info: dict[str, Any]) -> Callable:
    """The evaluation transform of a folder run, from its ``data.json`` dict: convert to RGB or L, resize the short
    side to ``image_size``, centre crop to ``image_size`` square, scale to [0, 1], normalise with the run's
    ``mean``/``std``. Takes PIL images."""
    size = int(info["image_size"])
    convert, to_image, to_float = _to_float(info)
    return T.Compose([convert, T.Resize(size), T.CenterCrop(size), to_image, to_float,
                      T.Normalize(list(info["mean"]), list(info["std"]))])


def train_transform(info: dict[str, Any], cutout: int = 0) -> Callable:
    """The training transform of a folder: DARTS's CIFAR recipe after resizing the short side to ``image_size``
    (random crop of that side with 1/8 of it as padding, horizontal flip), then normalisation and cutout if asked."""
    size = int(info["image_size"])
    convert, to_image, to_float = _to_float(info)
    steps = [convert, T.Resize(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), to_image,
             to_float, T.Normalize(list(info["mean"]), list(info["std"]))]
    if cutout > 0:
        steps.append(Cutout(cutout))
    return T.Compose(steps)


def _open_image(path: str):
    """The decoded image at ``path``; a DataError naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not in the middle of a run
            return image.copy() if image.mode not in ("P", "PA") else image.convert("RGBA")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """PIL's complaint, in a few words (its own messages repeat the path or suggest a global setting)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file that Pillow can decode"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(" (Use ImageFile.LOAD_TRUNCATED_IMAGES")[0].lower()


class FolderImages(Dataset):
    """(path, label) samples of an image folder, decoded and transformed when read."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None = None,
                 info: DatasetInfo | None = None) -> None:
        self.samples, self.transform, self.info = samples, transform, info
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = _open_image(path)
        return (self.transform(image) if self.transform else image), label


class _Check(Dataset):
    """Reads one image: (index, mode, error message or "")."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            return i, _open_image(self.samples[i][0]).mode, ""
        except DataError as exc:
            return i, "", str(exc)


@dataclass
class FolderParts:
    """An image folder read and validated: its training and held-out samples and its :class:`DatasetInfo`."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    info: DatasetInfo
    skipped: list[str]  # the unreadable files left out (--skip-bad-images)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_files(folder: Path, data_root: Path) -> list[str]:
    """The image files under ``folder``, recursively, in ImageFolder's order (by folder, then name). Unlike
    ImageFolder, which follows every link, a linked folder is followed once, and never when it leads into the
    data root: the images there are read where they are, and a link such as ``cat/up -> ..`` would otherwise loop,
    listing the whole folder again under ``cat`` at every level."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    root_real, own_real = os.path.realpath(data_root), os.path.realpath(folder)
    seen = {own_real}
    listed = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            real = os.path.realpath(full)
            plain = real == os.path.join(own_real, os.path.relpath(full, folder))  # reached through no link
            if real in seen or (not plain and _inside(real, root_real)):
                log.warning(f"not following the link {full}: it leads back to {real}, whose images are read once "
                            f"where they are")
                continue
            seen.add(real)
            keep.append(name)
        dirnames[:] = keep
        listed.append((dirpath, sorted(f for f in filenames if has_file_allowed_extension(f, IMG_EXTENSIONS))))
    return [os.path.join(d, f) for d, names in sorted(listed) for f in names]


def _file_key(path: str) -> tuple:
    """What makes two paths one file (links and hard links included); a path that cannot be read stands alone."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", path)
    return (st.st_dev, st.st_ino)


def _unique(samples: list[tuple[str, int]], classes: list[str],
            first: dict[tuple, tuple[str, int]] | None = None) -> list[tuple[str, int]]:
    """``samples`` with every file once (a file listed again in its class, through a link, is left out); a
    DataError naming both paths when one file is under two classes. ``first`` carries the files seen before
    (the training folder's, for val/), where any repeat is an error."""
    earlier = dict(first or {})
    seen: dict[tuple, tuple[str, int]] = {}
    out = []
    for path, label in samples:
        key = _file_key(path)
        if key in earlier:
            other = earlier[key][0]
            raise DataError(f"{path} and {other} are the same file, in the training and the held-out images; "
                            f"keep one of them")
        if key in seen:
            other, other_label = seen[key]
            if other_label != label:
                raise DataError(f"{path} and {other} are the same file under two classes "
                                f"({classes[label]} and {classes[other_label]}); keep it in one")
            continue
        seen[key] = (path, label)
        out.append((path, label))
    if len(out) < len(samples):
        log.warning(f"{len(samples) - len(out)} image file(s) listed twice in their class (through links) "
                    f"are read once")
    return out


def _discover(root: Path, classes: list[str] | None = None, data_root: Path | None = None,
              first: dict[tuple, tuple[str, int]] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder's classes and samples of ``root`` (``classes`` given, for a val/ folder: those, in that order),
    each file once (:func:`_class_files`, :func:`_unique`; ``first``: the training folder's files), with a
    DataError for no class folders, a single class and empty classes."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    try:
        found = find_classes(str(root))[0]
    except FileNotFoundError:
        raise DataError(f"{root} holds no class folders: expected {root}/<class>/<image> (or train/ and val/ "
                        f"folders holding them), as torchvision's ImageFolder reads") from None
    if classes is not None and set(found) - set(classes):
        raise DataError(f"{root} has class folders that the training folder lacks: "
                        f"{', '.join(sorted(set(found) - set(classes)))}")
    classes = classes or found
    if len(classes) < 2:
        raise DataError(f"{root} holds one class folder ({classes[0]}): a classifier needs at least 2 classes")
    label = {c: i for i, c in enumerate(classes)}
    listed = [(path, label[c]) for c in sorted(classes) if (root / c).is_dir()
              for path in _class_files(root / c, data_root or root)]
    samples = _unique(listed, classes, first)
    counts = torch.bincount(torch.tensor([t for _, t in samples], dtype=torch.long), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0 and (root / c).is_dir()]
    if empty:
        raise DataError(f"class folder(s) with no images ({', '.join(IMG_EXTENSIONS)}) in {root}: {', '.join(empty)}")
    return classes, samples


def _check_images(samples: list[tuple[str, int]], skip_bad_images: bool,
                  workers: int) -> tuple[list[tuple[str, int]], list[str], set[str]]:
    """Decode every image once (in ``workers`` processes), so that a corrupt file is named before a run starts.
    Returns the readable samples, the skipped files' messages and the PIL modes seen; without
    ``skip_bad_images`` an unreadable file is a DataError."""
    loader = DataLoader(_Check(samples), batch_size=None, num_workers=workers)
    bad, modes = [], set()
    for i, mode, error in loader:
        if error:
            bad.append((int(i), error))
        else:
            modes.add(mode)
    bad.sort()
    if bad and not skip_bad_images:
        more = f" (and {len(bad) - 1} more unreadable files)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][1]}{more}; remove or replace it, or pass --skip-bad-images to leave such files out")
    if bad:
        log.warning(f"--skip-bad-images: left out {len(bad)} unreadable image file(s), the first: {bad[0][1]}")
    dropped = {i for i, _ in bad}
    return [s for i, s in enumerate(samples) if i not in dropped], [e for _, e in bad], modes


def _split(samples: list[tuple[str, int]], num_classes: int) -> tuple[list, list]:
    """Hold out :data:`VAL_FRACTION` of each class (at least one image of a class with two or more), drawn by
    :data:`SPLIT_SEED`. Returns (training part, held-out part)."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    by_class: list[list[tuple[str, int]]] = [[] for _ in range(num_classes)]
    for sample in samples:
        by_class[sample[1]].append(sample)
    train, val = [], []
    for own in by_class:
        order = torch.randperm(len(own), generator=g).tolist()
        k = max(1, round(VAL_FRACTION * len(own))) if len(own) >= 2 else 0
        val += [own[i] for i in order[:k]]
        train += [own[i] for i in order[k:]]
    return train, val


def _shuffled(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``samples`` in a fixed random order, so that the first images of a training part (the search's weight half,
    ``--limit``) mix the classes instead of following the folders."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    return [samples[i] for i in torch.randperm(len(samples), generator=g).tolist()]


def _statistics(samples: list[tuple[str, int]], info: dict[str, Any], workers: int) -> tuple[list, list]:
    """Per-channel mean and std of the training images as the network sees them (evaluation resize and crop,
    scaled to [0, 1]), over a seeded sample of at most :data:`STATS_SAMPLE` images: enough for normalisation
    without reading a large folder twice."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    pick = torch.randperm(len(samples), generator=g)[:STATS_SAMPLE].tolist()
    size = int(info["image_size"])
    convert, to_image, to_float = _to_float(info)
    view = T.Compose([convert, T.Resize(size), T.CenterCrop(size), to_image, to_float])
    loader = DataLoader(FolderImages([samples[i] for i in pick], view), batch_size=64, num_workers=workers)
    total = total_sq = None
    n = 0
    for x, _ in loader:
        x = x.double()
        s, sq = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-3)  # a flat channel stays finite
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def open_folder(data_dir: str | Path | None, image_size: int | None = None, skip_bad_images: bool = False,
                workers: int = 0, saved: dict[str, Any] | None = None) -> FolderParts:
    """Read and validate an image folder in torchvision's ImageFolder layout: ``DIR/train/<class>/<image>`` with
    ``DIR/val/<class>/<image>`` when present, otherwise ``DIR/<class>/<image>`` split by :func:`_split`. Every image
    is decoded once here, so bad data is refused (a DataError) before a run folder exists. The input channels follow
    the data (1 when every image is single-channel, else 3: RGBA and palette images become RGB); the normalisation
    comes from the training part (:func:`_statistics`), or from ``saved`` (a run's ``data.json``), whose classes the
    folder must then have."""
    if data_dir is None:
        raise DataError("--dataset folder reads the images under --data-dir DIR (DIR/<class>/<image>, or DIR/train/ "
                        "and DIR/val/ holding class folders)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"no image folder at {root}")
    saved_classes = list(saved["classes"]) if saved else None
    if (root / "train").is_dir():
        classes, train = _discover(root / "train", data_root=root)
        first = {_file_key(path): (path, label) for path, label in train}
        val = _discover(root / "val", classes, root, first)[1] if (root / "val").is_dir() else []
    else:
        classes, train = _discover(root)
        val = None
    if saved_classes is not None and classes != saved_classes:
        raise DataError(f"{root} has the classes {', '.join(classes)}; the run was trained on "
                        f"{', '.join(saved_classes)}")
    everything, skipped, modes = _check_images(train + (val or []), skip_bad_images, workers)
    if not everything:
        raise DataError(f"no readable images in {root}")
    if val is None:
        train, val = _split(everything, len(classes))
    else:
        kept = set(everything)
        train, val = [s for s in train if s in kept], [s for s in val if s in kept]
    if not train:
        raise DataError(f"no readable training images in {root}")
    images = {"train": _per_class(train, classes), "held_out": _per_class(val, classes)}
    empty = [c for c, n in images["train"].items() if n == 0]
    if empty:
        raise DataError(f"class(es) without a readable training image in {root}: {', '.join(empty)}"
                        f"{' (--skip-bad-images left out all their files)' if skipped else ''}; remove the class "
                        f"folder or add images to it")
    train = _shuffled(train)
    if saved is not None:
        info = DatasetInfo("folder", int(saved["in_channels"]), len(classes), int(saved["image_size"]),
                           tuple(saved["mean"]), tuple(saved["std"]), tuple(classes))
        return FolderParts(train, val, info, skipped)
    in_channels = 1 if modes <= _GRAY_MODES else 3
    side = image_size or FOLDER_IMAGE_SIZE
    mean, std = _statistics(train, {"in_channels": in_channels, "image_size": side}, workers)
    return FolderParts(train, val, DatasetInfo("folder", in_channels, len(classes), side, tuple(mean), tuple(std),
                                               tuple(classes), images), skipped)


def describe_images(images: dict[str, dict[str, int]]) -> str:
    """One line: an image folder's images per class in each part (``DatasetInfo.images``)."""
    return "images per class: " + "; ".join(
        f"{part.replace('_', ' ')} " + ", ".join(f"{c} {n}" for c, n in counts.items())
        for part, counts in images.items())


def _per_class(samples: list[tuple[str, int]], classes: list[str]) -> dict[str, int]:
    counts = torch.bincount(torch.tensor([label for _, label in samples], dtype=torch.long), minlength=len(classes))
    return dict(zip(classes, counts.tolist()))


# -- data.json: what a run's network takes ---------------------------------------------------------------------------
DATA_JSON = "data.json"


def data_record(info: DatasetInfo) -> dict[str, Any]:
    """``data.json``'s content: dataset name, class names in label order, input channels, input side, and the
    per-channel mean and std applied after scaling pixels to [0, 1]; for an image folder the images per class in
    the training and the held-out part."""
    record = {"dataset": info.name, "classes": list(info.classes), "in_channels": info.in_channels,
              "image_size": info.image_size, "mean": [float(v) for v in info.mean],
              "std": [float(v) for v in info.std]}
    if info.images is not None:
        record["images"] = info.images
    return record


def data_json_text(info: DatasetInfo) -> str:
    return json.dumps(data_record(info), indent=2) + "\n"


def write_data_json(run_dir: str | Path, info: DatasetInfo) -> None:
    """Write the run folder's ``data.json`` atomically (a temporary file renamed into place)."""
    from .atomic import write_text

    write_text(data_json_text(info), Path(run_dir) / DATA_JSON)


def _check_record(record: Any, path: Path) -> dict[str, Any]:
    """``record`` when it has every key with a sensible value; a one-line DataError naming the first bad one."""
    if not isinstance(record, dict):
        raise DataError(f"{path} is not a JSON object")

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)

    c = record.get("in_channels")
    checks = [
        ("dataset", lambda v: isinstance(v, str) and v, "a dataset name"),
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
         "a non-empty list of names"),
        ("in_channels", lambda v: v in (1, 3), "1 or 3"),
        ("image_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        ("mean", lambda v: numbers(v) and len(v) == c, "a list of one number per channel"),
        ("std", lambda v: numbers(v) and len(v) == c and all(x > 0 for x in v), "a list of one number > 0 per channel"),
    ]
    for key, ok, expected in checks:
        if key not in record:
            raise DataError(f"{path} is incomplete: no {key}")
        if not ok(record[key]):
            raise DataError(f"{path}: {key!r} must be {expected}, got {record[key]!r}")
    return record


def _dataset_named_in(run_dir: Path) -> str | None:
    for name in ("config.json", "model.json"):
        try:
            dataset = json.loads((run_dir / name).read_text()).get("dataset")
        except (OSError, ValueError, AttributeError):
            continue
        if dataset:
            return dataset
    return None


def read_data_json(run_dir: str | Path) -> dict[str, Any]:
    """The ``data.json`` of a search or retraining run folder, checked; for a run written before ``data.json``
    existed, the same record rebuilt from the built-in dataset its ``config.json`` (or ``model.json``) names."""
    run_dir = Path(run_dir)
    path = run_dir / DATA_JSON
    try:
        return _check_record(json.loads(path.read_text()), path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    dataset = _dataset_named_in(run_dir)
    if dataset is None or dataset not in DATASETS:
        raise DataError(f"{run_dir} holds no {DATA_JSON} (every search and retraining writes it when it starts): "
                        f"the classes and the image transform of its model are unknown")
    record = data_record(dataset_info(dataset))
    record["classes"] = record["classes"] or [str(i) for i in range(dataset_info(dataset).num_classes)]
    return record


def check_resumed_data(run_dir: str | Path, info: DatasetInfo) -> None:
    """On ``--resume``: the data must still be what the run started on (classes, channels, size); a run from
    before ``data.json`` existed gets one."""
    if not (Path(run_dir) / DATA_JSON).exists():
        write_data_json(run_dir, info)
        return
    saved, now = read_data_json(run_dir), data_record(info)
    changed = [k for k in ("dataset", "classes", "in_channels", "image_size") if saved[k] != now[k]]
    if changed:
        raise DataError(f"the data changed since the run started ({', '.join(changed)}: now {now[changed[0]]!r}, "
                        f"was {saved[changed[0]]!r})")
