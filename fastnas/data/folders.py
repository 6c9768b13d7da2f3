"""Image folders in torchvision's ImageFolder layout: discovery (links followed once, duplicates refused), every
image decoded once before a run starts, the held-out split, and the normalisation statistics."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..runtime import log
from .sources import DatasetInfo
from .transforms import _GRAY_MODES, eval_transform


FOLDER_IMAGE_SIZE = 32  # the network's input side for a folder when --image-size is not given
VAL_FRACTION = 0.2  # a folder without val/: this share of each class is held out, by a fixed seed
SPLIT_SEED = 0  # fixed, so that searches and retrainings with any --seed hold out the same images
STATS_SAMPLE = 2000  # normalisation statistics come from at most this many training images (seeded sample)


def _open_image(path: str):
    """The decoded image at ``path``; a DataError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not in the middle of a run
            return image.copy() if image.mode not in ("P", "PA") else image.convert("RGBA")
    except UnidentifiedImageError:  # PIL's own message repeats the path
        raise DataError(f"cannot read image {path}: not an image file that Pillow can decode") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # in a few words: no global setting
        raise DataError(f"cannot read image {path}: "
                        f"{reason.split(' (Use ImageFile.LOAD_TRUNCATED_IMAGES')[0].lower()}") from None


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


class _Check(FolderImages):
    """Reads one image: (index, mode, error message or "")."""

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


def _class_files(folder: Path, data_root: Path) -> list[str]:
    """The image files under ``folder``, recursively, in ImageFolder's order (by folder, then name). Unlike
    ImageFolder, a linked folder is followed once, and never when it leads into the data root (whose images are read
    where they are; ``cat/up -> ..`` would otherwise list the whole folder again under ``cat`` at every level)."""
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
            if real in seen or (not plain and os.path.commonpath([real, root_real]) == root_real):
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
    earlier = first or {}
    seen: dict[tuple, tuple[str, int]] = {}
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
    if len(seen) < len(samples):
        log.warning(f"{len(samples) - len(seen)} image file(s) listed twice in their class (through links) "
                    f"are read once")
    return list(seen.values())


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
    empty = [c for c, n in _per_class(samples, classes).items() if n == 0 and (root / c).is_dir()]
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
    ``--limit``, the statistics' sample) mix the classes instead of following the folders."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    return [samples[i] for i in torch.randperm(len(samples), generator=g).tolist()]


def _statistics(samples: list[tuple[str, int]], info: dict[str, Any], workers: int) -> tuple[list, list]:
    """Per-channel mean and std of the training images as the network sees them (evaluation resize and crop,
    scaled to [0, 1]), over a seeded sample of at most :data:`STATS_SAMPLE` images: enough for normalisation
    without reading a large folder twice."""
    view = eval_transform(info, normalise=False)
    loader = DataLoader(FolderImages(_shuffled(samples)[:STATS_SAMPLE], view), batch_size=64, num_workers=workers)
    total = total_sq = n = 0
    for x, _ in loader:
        x = x.double()
        total, total_sq = total + x.sum((0, 2, 3)), total_sq + x.square().sum((0, 2, 3))
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
    if (root / "train").is_dir():
        classes, train = _discover(root / "train", data_root=root)
        first = {_file_key(path): (path, label) for path, label in train}
        val = _discover(root / "val", classes, root, first)[1] if (root / "val").is_dir() else []
    else:
        classes, train = _discover(root)
        val = None
    if saved is not None and classes != list(saved["classes"]):
        raise DataError(f"{root} has the classes {', '.join(classes)}; the run was trained on "
                        f"{', '.join(saved['classes'])}")
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
    else:
        in_channels, side = 1 if modes <= _GRAY_MODES else 3, image_size or FOLDER_IMAGE_SIZE
        mean, std = _statistics(train, {"in_channels": in_channels, "image_size": side}, workers)
        info = DatasetInfo("folder", in_channels, len(classes), side, tuple(mean), tuple(std), tuple(classes), images)
    return FolderParts(train, val, info, skipped)


def describe_images(images: dict[str, dict[str, int]]) -> str:
    """One line: an image folder's images per class in each part (``DatasetInfo.images``)."""
    return "images per class: " + "; ".join(
        f"{part.replace('_', ' ')} " + ", ".join(f"{c} {n}" for c, n in counts.items())
        for part, counts in images.items())


def _per_class(samples: list[tuple[str, int]], classes: list[str]) -> dict[str, int]:
    counts = torch.bincount(torch.tensor([label for _, label in samples], dtype=torch.long), minlength=len(classes))
    return dict(zip(classes, counts.tolist()))
