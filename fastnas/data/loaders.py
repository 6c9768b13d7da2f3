"""The data of a run: the search's two splits and retraining's train and test data, from any source; the input
side's checks."""
from __future__ import annotations

from ..errors import ConfigError, DataError
from .folders import FOLDER_IMAGE_SIZE, FolderImages, open_folder
from .record import data_record
from .samplers import EpochShuffle, loader_workers, seeded_loader
from .sources import dataset_info, load_split
from .transforms import eval_transform, train_transform


def search_loaders(name: str, batch_size: int, train_portion: float = 0.5, data_dir=None, download: bool = False,
                   seed: int = 0, workers: int | None = 0, limit: int | None = None, rank: int = 0,
                   world_size: int = 1, image_size: int | None = None, skip_bad_images: bool = False,
                   pin_memory: bool = False):
    """DARTS's search split: the first ``train_portion`` of the training set trains the weights, the rest the
    architecture (a folder's held-out images are not used). Returns (weight loader, architecture loader, info). With
    ``world_size`` > 1 each loader yields rank ``rank``'s shard of its split (``batch_size`` images a batch on every
    rank)."""
    workers = loader_workers(name, workers)
    data = _training_data(name, data_dir, download, 0, limit, image_size, skip_bad_images, workers)[0]
    split = int(len(data) * train_portion)
    if split < 1 or split >= len(data):
        raise DataError(f"{len(data)} training images cannot be split with train_portion {train_portion}")
    loaders = []
    for part, indices in enumerate((range(split), range(split, len(data)))):
        sampler = EpochShuffle(indices, seed + part, rank, world_size)
        loaders.append(seeded_loader(data, batch_size, sampler, workers, pin_memory))
    return loaders[0], loaders[1], data.info


def train_test_data(name: str, data_dir=None, download: bool = False, cutout: int = 0, limit: int | None = None,
                    image_size: int | None = None, skip_bad_images: bool = False, workers: int = 0):
    """The augmented training split and the test split (a folder's held-out part) for retraining.
    Returns (train data, test data, info)."""
    train, parts = _training_data(name, data_dir, download, cutout, limit, image_size, skip_bad_images, workers)
    if parts is None:
        return train, load_split(name, train=False, data_dir=data_dir, download=download), train.info
    if not parts.val:
        raise DataError(f"{data_dir} leaves no images to test on: give each class at least 2 images (or a val/ folder)")
    return train, FolderImages(parts.val, eval_transform(data_record(parts.info)), parts.info), parts.info


def _training_data(name: str, data_dir, download: bool, cutout: int, limit: int | None, image_size: int | None,
                   skip_bad_images: bool, workers: int) -> tuple:
    """The augmented training split of ``name``, and a folder's :class:`FolderParts` (None for a built-in dataset,
    for which an ``--image-size`` other than its own side is refused)."""
    if name != "folder":
        native = dataset_info(name).image_size
        if image_size not in (None, native):
            raise DataError(f"--image-size applies to --dataset folder; {name} images are {native}x{native}")
        return load_split(name, train=True, data_dir=data_dir, download=download, augment=True, cutout=cutout,
                          limit=limit), None
    parts = open_folder(data_dir, image_size, skip_bad_images, workers)
    transform = train_transform(data_record(parts.info), cutout)
    return FolderImages(parts.train[:limit], transform, parts.info), parts


def check_image_size(name: str, image_size: int | None, layers: int) -> None:
    """Refuse, before any image is read, an input side too small for the network's reductions (for a folder a
    DataError that says which --image-size would do)."""
    from ..supernet import check_input_size, reduction_layers

    side = (image_size or FOLDER_IMAGE_SIZE) if name == "folder" else dataset_info(name).image_size
    try:
        check_input_size(side, side, layers)
    except ConfigError as exc:
        if name != "folder":
            raise
        need = 2 ** len(reduction_layers(layers))
        raise DataError(f"--image-size {side}: {exc}; pass --image-size {need} or more") from None
