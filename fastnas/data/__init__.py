"""Datasets: the embedded default (scikit-learn's handwritten digits), CIFAR-10/100 from disk, and the user's own
image folders.

The digits ship inside scikit-learn, so a search runs offline on a fresh machine. CIFAR is read from the standard
python-version folders (``cifar-10-batches-py``, ``cifar-100-python``) under ``data_dir``, or downloaded with
``download=True`` where a network is there. An image folder has torchvision's ``ImageFolder`` layout (see
:func:`open_folder`). Every run writes ``data.json`` (:func:`data_record`): the class names, input channels, image
side and normalisation that everything downstream of the run uses. One module a job (docs/run-layer.md).
"""
from ..errors import DataError
from .folders import FolderImages, describe_images, open_folder
from .loaders import check_image_size, search_loaders, train_test_data
from .record import DATA_JSON, check_resumed_data, data_json_text, data_record, read_data_json
from .samplers import EpochShuffle, loader_workers, ordered_loader, seeded_loader, set_epoch
from .sources import DATASETS, _digits, dataset_info, load_split
from .transforms import eval_transform

__all__ = ["DATASETS", "DATA_JSON", "DataError", "EpochShuffle", "FolderImages", "_digits", "check_image_size",
           "check_resumed_data", "data_json_text", "data_record", "dataset_info", "describe_images", "eval_transform",
           "load_split", "loader_workers", "open_folder", "ordered_loader", "read_data_json", "search_loaders",
           "seeded_loader", "set_epoch", "train_test_data"]
