"""Is reading images the bottleneck of a search on an image folder? ``python -m benchmarks.data_loading``.

Generates a folder of PNGs (default 512 images of 64×64, 4 classes, random RGB) in a temporary folder and measures,
on the same data:

- the folder check (every image decoded once) and the normalisation statistics, as a run does before it starts;
- the training loader of a search (``fastnas.data.search_loaders``: decode, resize, random crop, flip, normalise,
  batches of 64) in images per second, with the default worker processes and with none; the first pass (worker
  start-up) is excluded;
- the search step's own images per second: the first-order step (``Architect.step`` then ``weight_step``, as
  ``Search.train_epoch`` runs it) of the ``quick`` preset's supernet at that image size, on batches fetched
  beforehand, so that no reading is timed; all images over all the time of the steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastnas import runtime
from fastnas.architect import weight_step
from fastnas.config import SEARCH_PRESETS, SearchConfig, merge, preset
from fastnas.data import loader_workers, open_folder, search_loaders


def make_folder(root: Path, images: int, classes: int, size: int, seed: int = 0) -> Path:
    """``images`` random RGB PNGs of ``size``×``size`` spread over ``classes`` class folders."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g)
        Image.fromarray(pixels.numpy(), "RGB").save(folder / f"{i}.png")
    return root


def loader_throughput(root: Path, size: int, batch: int, workers: int | None, passes: int = 2) -> float:
    """Images per second through the search's weight loader, over the passes after the first."""
    loader = search_loaders("folder", batch, 0.5, str(root), image_size=size, workers=workers)[0]
    rates = []
    for p in range(passes + 1):
        n, start = 0, time.perf_counter()
        for x, _ in loader:
            n += x.shape[0]
        if p > 0:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def search_step_throughput(root: Path, size: int, steps: int) -> tuple[float, int, SearchConfig]:
    """Images per second of the quick preset's first-order search step at ``size``×``size``, reading excluded."""
    from fastnas.search import Search

    cfg = SearchConfig.from_dict(merge(merge(SearchConfig().to_dict(), preset("quick", SEARCH_PRESETS)),
                                       dict(dataset="folder", data_dir=str(root), image_size=size, device="cpu")))
    search = Search(cfg, None, progress=False)
    batches = list(zip(_batches(search.train_loader, steps + 1), _batches(search.valid_loader, steps + 1)))
    lr, times, sizes = search.scheduler.get_last_lr()[0], [], []
    search.model.train()
    for (x, y), (xv, yv) in batches:
        x, y = runtime.to_device(x, y, search.device, search.channels_last)
        xv, yv = runtime.to_device(xv, yv, search.device, search.channels_last)
        start = time.perf_counter()
        search.architect.step(x, y, xv, yv, lr, search.optimizer)
        weight_step(search.model, search.forward, search._loss, search.optimizer, x, y, cfg.grad_clip,
                    search.model.arch_parameters(), search.scaler)
        times.append(time.perf_counter() - start)
        sizes.append(x.shape[0])
    return sum(sizes[1:]) / sum(times[1:]), max(sizes), cfg


def _batches(loader, n: int) -> list:
    """The first ``n`` batches of ``loader``, starting over when it runs out."""
    out = []
    while len(out) < n:
        out += [b for _, b in zip(range(n - len(out)), loader)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loading", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image side, and the network's input side")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch (the quick preset's)")
    p.add_argument("--steps", type=int, default=3, help="timed search steps (after one warm-up step)")
    p.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fastnas-bench-") as tmp:
        root = make_folder(Path(tmp) / "images", args.images, args.classes, args.size)
        start = time.perf_counter()
        open_folder(root, args.size, workers=loader_workers("folder", None))
        check_s = time.perf_counter() - start
        default_workers = loader_workers("folder", None)
        with_workers = loader_throughput(root, args.size, args.batch_size, None)
        without = loader_throughput(root, args.size, args.batch_size, 0)
        step, batch, cfg = search_step_throughput(root, args.size, args.steps)
    print(f"{args.images} PNGs of {args.size}x{args.size}, {args.classes} classes; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  folder check + statistics (before a run): {check_s:.2f} s ({args.images / check_s:.0f} images/s)")
    print(f"  training loader, {default_workers} worker(s) (default): {with_workers:8.0f} images/s")
    print(f"  training loader, no workers:            {without:8.0f} images/s")
    print(f"  search step (quick preset: C={cfg.C}, {cfg.layers} cells, order {cfg.order}, batch {batch}): "
          f"{step:8.1f} images/s")
    print(f"  loader / step: {with_workers / step:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
