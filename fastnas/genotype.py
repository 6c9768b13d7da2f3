"""Genotypes: the discrete cells that a search derives, with JSON and DARTS-string round trips."""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .errors import ConfigError, DivergedError

MAX_CONCAT = 64  # longest range() a genotype string may expand (a cell concatenates a handful of states)

Edge = tuple[str, int]  # (op name, index of the input state: 0 = c_{k-2}, 1 = c_{k-1}, 2.. = intermediate nodes)


class Genotype(NamedTuple):
    """A cell pair as DARTS writes it: two (op, input) edges per intermediate node, and the concatenated nodes."""

    normal: list[Edge]
    normal_concat: list[int]
    reduce: list[Edge]
    reduce_concat: list[int]

    def __str__(self) -> str:
        return (f"Genotype(normal={self.normal!r}, normal_concat={self.normal_concat!r}, "
                f"reduce={self.reduce!r}, reduce_concat={self.reduce_concat!r})")

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def ops(self) -> set[str]:
        return {op for op, _ in self.normal + self.reduce}

    def to_dict(self) -> dict:
        return {
            "normal": [[op, i] for op, i in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, i] for op, i in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        if not isinstance(d, dict):
            raise ConfigError(f"a genotype must be a dict with normal, normal_concat, reduce and reduce_concat, got "
                              f"{type(d).__name__}")
        missing = [k for k in cls._fields if k not in d]
        if missing:
            raise ConfigError(f"not a genotype: missing {', '.join(missing)}")
        g = cls(normal=_edges(d["normal"], "normal"), normal_concat=_indices(d["normal_concat"], "normal_concat"),
                reduce=_edges(d["reduce"], "reduce"), reduce_concat=_indices(d["reduce_concat"], "reduce_concat"))
        g.validate()
        return g

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Genotype":
        """A genotype from JSON text or from the path of a JSON file."""
        if not isinstance(text_or_path, (str, Path)):
            raise ConfigError(f"expected genotype JSON or a path, got {type(text_or_path).__name__}")
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise ConfigError(f"no genotype file at {path}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read the genotype file {path}: {exc}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"genotype JSON is malformed: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> "Genotype":
        """Read ``Genotype(normal=[...], normal_concat=..., ...)`` as DARTS-family code prints it, without ``eval``.

        ``normal_concat=range(2, 6)`` is accepted, as are the JSON form and a bare dict.
        """
        if not isinstance(text, str):
            raise ConfigError(f"expected a genotype string, got {type(text).__name__}")
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json(text)
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise ConfigError(f"cannot parse genotype string: {exc.msg} in {text!r:.200}") from None
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Genotype"):
            raise ConfigError(f"expected 'Genotype(normal=..., ...)', got {text!r:.200}")
        fields = {}
        for kw in node.keywords:
            fields[kw.arg] = _literal(kw.value)
        for name, value in zip(cls._fields, node.args):
            fields[name] = _literal(value)
        return cls.from_dict(fields)

    def validate(self, known_ops: Sequence[str] | None = None, steps: int | None = None) -> None:
        """Check structure (two edges per node, inputs that exist) and, optionally, op names and step count."""
        for kind, edges, concat in (("normal", self.normal, self.normal_concat), ("reduce", self.reduce, self.reduce_concat)):
            if len(edges) % 2 or not edges:
                raise ConfigError(f"genotype {kind} cell needs two edges per node, got {len(edges)} edges")
            n = len(edges) // 2
            if steps is not None and n != steps:
                raise ConfigError(f"genotype {kind} cell has {n} nodes, the network expects {steps}")
            for k, (op, i) in enumerate(edges):
                if not 0 <= i < 2 + k // 2:
                    raise ConfigError(f"genotype {kind} edge {k} ({op!r}, {i}) reads a state that does not exist yet")
                if known_ops is not None and op not in known_ops:
                    raise ConfigError(f"genotype {kind} cell uses unknown op {op!r}; known ops: {', '.join(known_ops)}")
            if not concat or any(not 0 <= c < 2 + n for c in concat):
                raise ConfigError(f"genotype {kind}_concat {_short(concat)} names states outside 0..{n + 1}")


def _literal(node: ast.AST):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range":
        return _range(node)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(f"genotype strings may hold only literals and range(...), found "
                          f"{_short(ast.unparse(node))}") from None


def _range(node: ast.Call) -> list[int]:
    """``range(...)`` of one to three small int literals, checked before it is expanded."""
    shown = _short(ast.unparse(node))
    try:
        args = [ast.literal_eval(a) for a in node.args]
    except (ValueError, TypeError, SyntaxError, RecursionError):
        args = None
    if node.keywords or args is None or not 1 <= len(args) <= 3 or \
            not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"range() in a genotype string takes one to three integers, got {shown}")
    r = range(*args) if args[-1] != 0 or len(args) < 3 else None
    if r is None:
        raise ConfigError(f"range() step must not be zero, got {shown}")
    if len(r) > MAX_CONCAT:
        raise ConfigError(f"{shown} has {len(r)} elements; a cell concatenates at most {MAX_CONCAT} states")
    return list(r)


def _short(value: object, limit: int = 120) -> str:
    """``repr``-like text of ``value``, cut to ``limit`` characters for an error message."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _edges(value: object, kind: str) -> list[Edge]:
    """A cell's (op name, input index) pairs, refusing what is not exactly that (no silent conversion)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"genotype {kind} must be a list of (op, input) pairs, got {_short(value)}")
    edges = []
    for k, edge in enumerate(value):
        if not isinstance(edge, (list, tuple)) or len(edge) != 2:
            raise ConfigError(f"genotype {kind} edge {k} must be an (op, input) pair, got {_short(edge)}")
        op, index = edge
        if not isinstance(op, str):
            raise ConfigError(f"genotype {kind} edge {k}: the op must be a name (a string), got {_short(op)}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ConfigError(f"genotype {kind} edge {k}: the input must be an integer, got {_short(index)}")
        edges.append((op, index))
    return edges


def _indices(value: object, kind: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in value):
        raise ConfigError(f"genotype {kind} must be a list of integers, got {_short(value)}")
    return list(value)


def gene_rows(gene: Sequence[Edge]) -> list[int]:
    """The row of the architecture weights of each edge of a derived cell (two per node, node i has i + 2 rows)."""
    starts = [sum(2 + j for j in range(i)) for i in range(len(gene) // 2)]
    return [starts[k // 2] + src for k, (_, src) in enumerate(gene)]


def derive_cell(weights: torch.Tensor, primitives: Sequence[str], steps: int,
                edge_weights: torch.Tensor | None = None) -> list[Edge]:
    """DARTS's rule: per node keep the two incoming edges whose strongest non-``none`` weight is largest, each with
    its strongest non-``none`` op. ``edge_weights`` (PC-DARTS edge normalisation) scale each edge before ranking."""
    w = weights.detach().double().cpu()
    if not bool(torch.isfinite(w).all()) or (edge_weights is not None and not bool(torch.isfinite(edge_weights).all())):
        raise DivergedError("the architecture weights hold NaN or infinite values: no genotype can be derived "
                            "(the search diverged; lower the learning rates)")
    if edge_weights is not None:
        w = w * edge_weights.detach().double().cpu()[:, None]
    keep = [k for k, p in enumerate(primitives) if p != "none"]
    gene, start = [], 0
    for i in range(steps):
        n = i + 2
        block = w[start:start + n][:, keep]
        strength = block.max(dim=1).values.tolist()
        ranked = sorted(range(n), key=lambda j: -strength[j])[:2]  # stable: ties go to the lower input index
        for j in ranked:
            row = block[j].tolist()
            best = max(range(len(row)), key=lambda k: (row[k], -k))  # ties go to the first op
            gene.append((primitives[keep[best]], j))
        start += n
    return gene


def derive(normal: torch.Tensor, reduce: torch.Tensor, primitives: Sequence[str], steps: int, multiplier: int,
           edge_normal: torch.Tensor | None = None, edge_reduce: torch.Tensor | None = None) -> Genotype:
    """A genotype from softmax weights of shape [edges, ops] for each cell type."""
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        normal=derive_cell(normal, primitives, steps, edge_normal), normal_concat=concat,
        reduce=derive_cell(reduce, primitives, steps, edge_reduce), reduce_concat=concat,
    )
