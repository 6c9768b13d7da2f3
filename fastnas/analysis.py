"""What a derived genotype says about attention, in the terms of Shin and Bae's analysis."""
from __future__ import annotations

from collections import Counter

from .genotype import Genotype

PAPER_FINDING = ("Shin and Bae's searched cell: channel attention only (spatial never chosen), in the normal cell "
                 "only (5 of its 8 edges), mostly on the previous cell's output c_{k-1}.")


def input_name(index: int) -> str:
    return ("c_{k-2}", "c_{k-1}")[index] if index < 2 else f"node {index - 2}"


def attention_edges(genotype: Genotype) -> dict[str, list[tuple[str, int, str]]]:
    """Per cell type, the attention edges as (op, destination node, input name)."""
    out = {}
    for kind in ("normal", "reduce"):
        edges = getattr(genotype, kind)
        out[kind] = [(op, k // 2, input_name(src)) for k, (op, src) in enumerate(edges) if "attention" in op]
    return out


def attention_report(genotype: Genotype) -> str:
    """A short text: which edges chose attention, in which cell type, from which input; and the paper's finding."""
    found = attention_edges(genotype)
    lines = []
    for kind in ("normal", "reduce"):
        edges = found[kind]
        total = len(getattr(genotype, kind))
        if not edges:
            lines.append(f"{kind} cell: no attention ({total} edges).")
            continue
        ops = Counter(op for op, _, _ in edges)
        sources = Counter(src for _, _, src in edges)
        lines.append(
            f"{kind} cell: {len(edges)} of {total} edges use attention ("
            + ", ".join(f"{op} x{n}" for op, n in ops.most_common()) + "); inputs: "
            + ", ".join(f"{src} x{n}" for src, n in sources.most_common()) + ".")
        for op, node, src in edges:
            lines.append(f"  node {node} <- {src}: {op}")
    lines.append(PAPER_FINDING)
    return "\n".join(lines)
