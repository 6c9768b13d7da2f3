"""Pictures of a run: each derived cell as a graph, and how the softmax weights moved over the epochs.

Pure matplotlib (Agg), so they render on a fresh machine without graphviz or any system package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .genotype import Edge  # noqa: E402

ATTENTION_COLORS = {"channel_attention": "tab:red", "spatial_attention": "tab:purple"}


def _is_attention(op: str) -> bool:
    return "attention" in op


def plot_cell(edges: Sequence[Edge], concat: Sequence[int], path: str | Path, title: str = "") -> None:
    """Draw one cell (:func:`cell_figure`) into ``path``."""
    fig = cell_figure(edges, concat, title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def cell_figure(edges: Sequence[Edge], concat: Sequence[int], title: str = "") -> "plt.Figure":
    """One cell: inputs c_{k-2}, c_{k-1} on the left, intermediate nodes, output c_k on the right."""
    steps = len(edges) // 2
    pos = {0: (0.0, 1.2), 1: (0.0, -1.2)}
    for i in range(steps):
        pos[2 + i] = (1.5 + 1.4 * i, 0.9 if i % 2 == 0 else -0.9)
    out = (1.5 + 1.4 * steps + 0.6, 0.0)
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{2 + i: str(i) for i in range(steps)}}

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * steps, 3.6))
    for k, (op, src) in enumerate(edges):
        dst = 2 + k // 2
        color = ATTENTION_COLORS.get(op, "0.25")
        rad = 0.25 if k % 2 == 0 else -0.25
        ax.annotate("", xy=pos[dst], xytext=pos[src],
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=2.0 if _is_attention(op) else 1.2,
                                    shrinkA=16, shrinkB=16, connectionstyle=f"arc3,rad={rad}"))
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        # the label sits at the middle of the arc (matplotlib's arc3 is a quadratic Bézier curve)
        lx, ly = (x0 + x1) / 2 + 0.5 * rad * (y1 - y0), (y0 + y1) / 2 - 0.5 * rad * (x1 - x0)
        ax.text(lx, ly, op, fontsize=7, color=color,
                ha="center", va="center", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for c in concat:
        ax.annotate("", xy=out, xytext=pos[c], arrowprops=dict(arrowstyle="-|>", color="0.6", lw=0.8,
                                                               shrinkA=16, shrinkB=18, linestyle="--"))
    for node, (x, y) in pos.items():
        face = "lightgreen" if node < 2 else "lightblue"
        ax.text(x, y, f"${names[node]}$" if node < 2 else names[node], ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="circle,pad=0.35" if node >= 2 else "round,pad=0.4", fc=face, ec="0.3"))
    ax.text(*out, "$c_{k}$", ha="center", va="center", fontsize=10,
            bbox=dict(boxstyle="round,pad=0.4", fc="khaki", ec="0.3"))
    ax.set_xlim(-0.8, out[0] + 0.8)
    ax.set_ylim(-2.0, 2.0)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def alpha_heatmap(weights: Sequence[Sequence[float]], primitives: Sequence[str], edge_names: Sequence[str],
                  title: str) -> "plt.Figure":
    """The softmax weights of one cell type as a heatmap: an edge a row, an op a column."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(primitives), 1.2 + 0.3 * len(edge_names)))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(primitives)), primitives, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(edge_names)), edge_names, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def plot_alpha_history(history: list[dict], primitives: Sequence[str], edge_names: Sequence[str],
                       path: str | Path) -> None:
    """One panel per edge and cell type: the softmax weight of every op against the epoch."""
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    n_edges = len(edge_names)
    cols = min(n_edges, 7)
    rows = -(-n_edges // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(2.3 * cols, 1.9 * 2 * rows), squeeze=False, sharex=True)
    cmap = plt.get_cmap("tab10" if len(primitives) <= 10 else "tab20")
    for r, kind in enumerate(("normal", "reduce")):
        for e, name in enumerate(edge_names):
            ax = axes[r * rows + e // cols][e % cols]
            for k, op in enumerate(primitives):
                ax.plot(epochs, [h[kind][e][k] for h in history], color=cmap(k), lw=1.6 if _is_attention(op) else 1.0,
                        label=op)
            ax.set_title(f"{kind} {name}", fontsize=7)
            ax.tick_params(labelsize=6)
    for r in range(2):
        for e in range(n_edges, rows * cols):  # hide the panels past the last edge
            axes[r * rows + e // cols][e % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(primitives), 6), fontsize=7)
    fig.suptitle("softmax weight of each op, per edge, over the epochs", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_collapse(history: list[dict], path: str | Path) -> None:
    """The collapse indicators over the epochs (``indicators`` of each ``alphas.json`` entry): parameter-free and
    attention edges of each derived cell, each cell type's α entropy, the Hessian's dominant eigenvalue and, where
    logged, the expected cost of the derived network (``expected_cost``, :mod:`fastnas.budget`)."""
    rows = [h for h in history if "indicators" in h]
    if not rows:
        return
    epochs = [h["epoch"] for h in rows]
    costs = [h.get("expected_cost") for h in rows]
    fig, axes = plt.subplots(1, 5 if all(costs) else 4, figsize=(16 if all(costs) else 13, 3.0))
    for ax, key, title in ((axes[0], "parameter_free", "parameter-free edges"), (axes[1], "attention",
                                                                                  "attention edges"),
                           (axes[2], "entropy", "entropy of softmax(α)")):
        for kind, style in (("normal", "-"), ("reduce", "--")):
            ax.plot(epochs, [h["indicators"][key][kind] for h in rows], style, marker="o", ms=3, label=kind)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    hess = [(e, h["indicators"].get("hessian_eigenvalue")) for e, h in zip(epochs, rows)]
    hess = [(e, v) for e, v in hess if v is not None]
    if hess:
        axes[3].plot(*zip(*hess), marker="o", ms=3, color="tab:red")
    else:
        axes[3].text(0.5, 0.5, "off (--hessian-every)", ha="center", va="center", transform=axes[3].transAxes)
    axes[3].set_title("dominant eigenvalue of ∇²α L_val", fontsize=9)
    if all(costs):
        axes[4].plot(epochs, [c["params"] / 1e6 for c in costs], marker="o", ms=3, label="params (M)")
        axes[4].plot(epochs, [c["madds"] / 1e6 for c in costs], marker="s", ms=3, label="madds (M)")
        if "latency" in costs[0]:
            axes[4].plot(epochs, [c["latency"] for c in costs], marker="^", ms=3, label="latency (ms)")
        axes[4].set_yscale("log")
        axes[4].set_title("expected cost of the derived network", fontsize=9)
        axes[4].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cells_side_by_side(images: Sequence[tuple[str, Sequence[str | Path]]], path: str | Path) -> None:
    """One row per (title, [cell pictures]) (e.g. a seed's normal.png and reduce.png), drawn side by side."""
    if not images:
        return
    cols = max(len(paths) for _, paths in images)
    fig, axes = plt.subplots(len(images), cols, figsize=(6.5 * cols, 2.9 * len(images)), squeeze=False)
    for r, (title, paths) in enumerate(images):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(paths) and Path(paths[c]).exists():
                ax.imshow(plt.imread(str(paths[c])))
                ax.set_title(f"{title}: {Path(paths[c]).stem}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
