"""Numbers and markdown tables for the reports (one formatting for every task)."""

from __future__ import annotations

import math

from culture_neurons.report.files import num


def fmt_points(x) -> str:
    """Accuracy points with one decimal; ``n/a`` when undefined."""
    return fmt(x, 1)


def fmt_flip(x) -> str:
    """A flip rate (fraction) with three decimals; ``n/a`` when undefined."""
    return fmt(x, 3)


def fmt(x, decimals: int) -> str:
    x = num(x)
    if math.isnan(x):
        return "n/a"
    text = f"{x:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def fmt_count(x) -> str:
    """A neuron count; RND's counts are means over draws, so they may be fractional."""
    x = num(x)
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-6 else f"{x:,.1f}"  # 1e-6: float sums of means


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A markdown table; ``align`` gives one ``l``/``r`` per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    return [row(header), row(rule)] + [row(r) for r in rows]


def row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
