"""Figures of the reports: matrix heatmaps and the per-layer distribution (matplotlib, Agg,
outside pyplot: no global state, nothing to close)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from culture_neurons.report.files import RunFiles
from culture_neurons.report.layers import layer_totals
from culture_neurons.report.tables import fmt, fmt_count

ANNOTATE_MAX_CULTURES = 10  # write values into heatmap cells up to this many cultures


def new_figure(width: float, height: float):
    """A figure outside pyplot (no global state, no display, nothing to close); Agg renders it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def heatmap(path: Path, m: np.ndarray, cultures: list[str], title: str, label: str,
            scale: tuple[float, float], diverging: bool,
            holds_zero: np.ndarray | None = None) -> None:  # fmt: skip
    """One [S, C] matrix: rows the ablated culture's neurons, columns the evaluated culture.

    ``scale`` (vmin, vmax) is shared by every method's figure of one kind, so colours compare
    across methods (:func:`shared_scale`). Cells where ``holds_zero`` [S, C] is True (their
    95 % interval holds 0: not distinguishable from no effect) are hatched.
    """
    import matplotlib
    from matplotlib.patches import Rectangle

    C = len(cultures)
    side = min(max(4.5, 0.35 * C + 3.0), 16.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    # diverging: centred at 0, red = accuracy lost, blue = gained
    cmap = matplotlib.colormaps["RdBu" if diverging else "viridis"]
    cmap = cmap.with_extremes(bad="lightgrey")  # NaN: a culture without evaluation items
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=scale[0], vmax=scale[1],
                      aspect="auto")  # fmt: skip
    fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    if holds_zero is not None:
        for i, j in zip(*np.nonzero(holds_zero), strict=True):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="grey", linewidth=0))  # fmt: skip
    ax.set_xticks(range(C), labels=cultures, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(C), labels=cultures)
    ax.set_xlabel("evaluated culture")
    ax.set_ylabel("culture whose neurons are changed")
    ax.set_title(title, fontsize=11)
    if C <= ANNOTATE_MAX_CULTURES:
        annotate(ax, m, image, decimals=1 if diverging else 3)
    save(fig, path)


def shared_scale(matrices: list[np.ndarray], diverging: bool) -> tuple[float, float]:
    """One (vmin, vmax) for several matrices: symmetric around 0 (diverging) or from 0."""
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices] or [np.zeros(0)])
    top = float(np.abs(finite).max()) if finite.size else 0.0
    top = top if top > 0 else 1.0
    return (-top, top) if diverging else (0.0, top)


def annotate(ax, m: np.ndarray, image, decimals: int) -> None:
    """Write each cell's value, white on dark cells and black on light ones."""
    for (i, j), v in np.ndenumerate(m):
        if not np.isfinite(v):
            continue
        r, g, b, _ = image.cmap(image.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, fmt(v, decimals), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")  # fmt: skip


def layers_figure(run: RunFiles, path: Path) -> bool:
    """Share of each method's selected neurons per layer; False (nothing written) if none."""
    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    drew = False
    for method in run.evals:
        totals = layer_totals(run, method)
        if totals.size == 0 or totals.sum() == 0:
            continue
        # Shares, not counts: methods select different totals (lape assigns a neuron to several
        # cultures); the legend keeps the counts.
        share = 100 * totals / totals.sum()
        label = f"{method} ({fmt_count(totals.sum())} neurons)"
        ax.plot(range(len(totals)), share, label=label, marker="o", ms=3)
        drew = True
    if not drew:
        return False
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer of the language model (0 = first)")
    ax.set_ylabel("share of the method's selected neurons (%)")
    ax.set_title(f"Where the selected neurons sit (summed over {len(run.cultures)} cultures)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return True


def save(fig, path: Path) -> None:
    """PNG written to a temporary file and renamed, so a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
