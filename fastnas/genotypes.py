"""Known genotypes, by name (``fastnas.train --genotype DARTS_V2``), and what ``--genotype`` accepts."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .genotype import Genotype

DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)
"""DARTS, first order (Liu et al., 2018)."""

DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)
"""DARTS, second order (Liu et al., 2018): 97.24% ± 0.09 on CIFAR-10 in the DARTS paper."""

DARTS = DARTS_V2

KNOWN = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}


def get(name: str) -> Genotype:
    if name not in KNOWN:
        raise ConfigError(f"unknown genotype name {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def resolve_genotype(spec: str | Genotype) -> Genotype:
    """A genotype from a known name (``DARTS_V2``), a ``genotype.json`` / ``genotype.txt`` file, a search run folder
    (its ``genotype.json``), or a ``Genotype(...)`` string / JSON text."""
    if isinstance(spec, Genotype):
        return spec
    text = str(spec).strip()
    if text in KNOWN:
        return get(text)
    if text.startswith(("Genotype(", "{")):
        return Genotype.parse(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "genotype.json").exists():
            raise ConfigError(f"{path} holds no genotype.json (a search run writes it when it finishes; "
                              f"resume an unfinished one with python -m fastnas.search --resume {path})")
        path = path / "genotype.json"
    if path.is_file():
        try:
            content = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read genotype file {path}: {exc}") from None
        return Genotype.parse(content)
    raise ConfigError(f"--genotype {text!r} is neither a genotype file, a search run folder, a known name "
                      f"({', '.join(KNOWN)}) nor a 'Genotype(normal=..., ...)' string")


def check_genotype(genotype: Genotype, steps: int) -> None:
    """One clear error for a genotype this network cannot build: unknown ops, or another number of nodes."""
    from .space import registered_ops

    try:
        genotype.validate(known_ops=registered_ops(), steps=steps)
    except ConfigError as exc:
        hint = " (pass --steps to match it)" if "network expects" in str(exc) else ""
        raise ConfigError(f"{exc}{hint}") from None
