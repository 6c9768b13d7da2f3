"""What the command lines of ``fastnas.search`` and ``fastnas.train`` share: run-folder, data and engine options,
presets merged with the options given, resuming a run with its own configuration, and the entry point."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import checkpoint, config as cfgmod, distributed, options, rundir, runtime
from .errors import CheckpointError, ConfigError, FastNASError, RunFolderError
from .runtime import log


def new_parser(prog: str, description: str, presets: dict[str, dict[str, Any]], preset_help: str,
               run_kind: str, config_class: type | None = None) -> argparse.ArgumentParser:
    """A parser with ``--preset`` and the run-folder options (``--out``, ``--run-dir``, ``--resume``,
    ``--no-progress``); with ``config_class``, also every option of that configuration, ``--config``,
    ``--print-config`` and ``--tensorboard``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None if config_class else "quick", choices=sorted(presets),
                   help=preset_help + (" (default: the --config file's preset, else quick)" if config_class else ""))
    p.add_argument("--out", default="runs", help="folder under which the run folder is created")
    p.add_argument("--run-dir", default=None, help=f"exact run folder to write (default: OUT/{run_kind}-PRESET-TIME)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --run-dir to name a folder that holds another run (its outputs are removed first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if config_class is None:
        return p
    p.add_argument("--config", metavar="FILE",
                   help="a YAML (or JSON) file of options, such as a run's config.json or what --print-config "
                        "writes; the preset < this file < the options given here")
    p.add_argument("--print-config", action="store_true",
                   help="write the resolved configuration as YAML (a --config file) and exit")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="write TensorBoard event files into the run folder (default: on when tensorboard is "
                        "installed; tensorboard --logdir runs)")
    options.add_options(p, config_class)
    return p


# options that do nothing without another: option -> (what it needs, whether the configuration has that)
_NEEDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "early_stop_patience": ("--early-stop", lambda c: c.early_stop),
    "compile_scope": ("--compile", lambda c: c.compile),
    "lr_gamma": ("--lr-schedule step", lambda c: c.lr_schedule == "step"),
    "lr_step": ("--lr-schedule step", lambda c: c.lr_schedule == "step"),
    "lr_min": ("--lr-schedule cosine", lambda c: getattr(c, "lr_schedule", "cosine") == "cosine"),
    "skip_bad_images": ("--dataset folder", lambda c: c.dataset == "folder"),
    "download": ("--dataset cifar10 or cifar100", lambda c: c.dataset in ("cifar10", "cifar100")),
}


def check_needed_options(given: dict[str, Any], cfg: Any) -> None:
    """A ConfigError for an option given without the one it works with (it would be accepted and ignored)."""
    for name, (needs, present) in _NEEDS.items():
        if given.get(name) is not None and hasattr(cfg, name) and not present(cfg):
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option} does nothing without {needs}: add {needs}, or leave {option} out")


RUN_KEYS = ("preset", "seeds", "genotype_source")  # what config.json holds beside the options


def config_from_args(args: argparse.Namespace, config_class: type, presets: dict[str, dict[str, Any]]):
    """The preset's settings, overridden by the ``--config`` file's, overridden by every option given (a config of
    ``config_class``, validated); the thread count is the one in use (a run records it: another count changes the
    last bits)."""
    from_file = options.read_file(args.config, config_class, RUN_KEYS) if getattr(args, "config", None) else {}
    if args.preset is None:
        args.preset = from_file.get("preset", "quick")
    if getattr(args, "seeds", 1) is None:
        args.seeds = from_file.get("seeds", 1)
    flags = options.given(args, config_class)
    base = cfgmod.merge(config_class().to_dict(), cfgmod.preset(args.preset, presets))
    cfg = config_class.from_dict(cfgmod.merge(base, {**{k: v for k, v in from_file.items() if k not in RUN_KEYS},
                                                     **flags}))
    check_needed_options(flags, cfg)  # a file may hold every option (a run's config.json)
    try:
        cfg.validate()
    except ConfigError as exc:
        where = [k for k in from_file if str(exc).startswith(options.flag_of(k) + " ")]
        raise ConfigError(f"{exc} (in {args.config})" if where else str(exc)) from None
    if cfg.threads is None:
        cfg.threads = torch.get_num_threads()
    else:
        torch.set_num_threads(cfg.threads)
    return cfg


def claim_run_dir(args: argparse.Namespace, prefix: str, resumable: bool = True) -> Path:
    """The new run's folder (``--run-dir``, or a fresh ``OUT/PREFIX-TIME``), created and locked for this run
    (``resumable``: whether the command has ``--resume``, which a refusal then suggests)."""
    if args.run_dir:
        return rundir.claim(args.run_dir, overwrite=args.overwrite, resumable=resumable)
    try:
        path = runtime.new_run_dir(args.out, prefix)
    except OSError as exc:
        raise RunFolderError(f"cannot create a run folder under {args.out}: {exc.strerror or exc}") from None
    return rundir.claim(path)


def write_run_start(run_dir: Path, config: dict[str, Any], info) -> None:
    """``config.json`` and ``data.json`` (:func:`fastnas.data.data_record`), committed together as a run starts;
    an image folder's images per class go to the log too."""
    from .data import DATA_JSON, data_json_text, describe_images

    checkpoint.write_together({run_dir / "config.json": runtime.json_text(config).encode(),
                               run_dir / DATA_JSON: data_json_text(info).encode()})
    if info.images is not None:
        log.info(describe_images(info.images))


def commit_epoch(run_dir: Path, epoch: int, files: dict[Path, bytes]) -> None:
    """Write an epoch's files together (:func:`checkpoint.write_together`); an I/O error (a full disk) becomes a
    one-line error that says the previous epoch's files are intact."""
    try:
        checkpoint.write_together(files)
    except OSError as exc:
        raise RunFolderError(f"cannot write epoch {epoch}'s files to {run_dir} ({exc.strerror or exc}); the files "
                             f"of epoch {epoch - 1} are intact: free some space and continue with --resume "
                             f"{run_dir}") from None


def explicit_options(argv: Sequence[str]) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def resume(args: argparse.Namespace, argv: Sequence[str], config_class: type, kind: str):
    """Load the checkpoint of ``--resume`` (every process reads it: the folder must be visible to all of them) and
    set up the processes. Returns (run folder, checkpoint, the run's own config, whether this is the main process);
    ``--epochs`` may extend the run, other options are ignored and said so."""
    run_dir = Path(args.resume)
    state = checkpoint.load(run_dir)
    if state.get("kind") != kind:
        raise CheckpointError(f"{run_dir} holds a {state.get('kind')!r} checkpoint, not a {kind} checkpoint")
    cfg = config_class.from_dict(state["config"])
    ignored = [o for o in explicit_options(argv) if o not in distributed.RESUME_OPTIONS]
    if args.epochs is not None:
        cfg.epochs = args.epochs
    main_process = runtime.setup_processes(cfg.device, args.dist_timeout, run_dir)
    if ignored:
        log.info(f"resuming with the run's own configuration; ignored: {' '.join(ignored)}")
    _restore_threads(cfg.threads, args.threads)
    return run_dir, state, cfg, main_process


def _restore_threads(saved: int | None, given: int | None) -> None:
    """Run on the thread count the run started with (runs from before it was recorded: ``given`` or PyTorch's)."""
    if saved is None:
        return
    if given is not None and given != saved:
        log.warning(f"--threads {given} ignored: the run continues on its own {saved} threads (another count "
                    f"changes the last bits of the results, and the run would not be the one it started as)")
    torch.set_num_threads(saved)


def main(prog: str, build_parser: Callable[[], argparse.ArgumentParser],
         run: Callable[[argparse.Namespace, list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Parse, then run under the launcher's error handling (fastnas errors: one line, exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"{prog}: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        return distributed.run_main(prog, lambda: run(args, argv), (FastNASError,))
    finally:
        rundir.release_all()  # the run folder is this command's only while it runs
