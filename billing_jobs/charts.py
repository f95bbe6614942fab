"""Charts for the month report, drawn by matplotlib and returned as inline SVG text.

Text stays text (`svg.fonttype = "none"`), so a page needs no font files; ids are
salted with a fixed string and the date is left out, so the same figures give the same
bytes. Values come in as exact integers (units of 1/10,000 or counts) and are turned
into floats only to be drawn.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("svg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from billing_jobs.rules.money import UNITS_PER_CREDIT

PALETTE = ["#1f6feb", "#d9480f", "#2f9e44", "#ae3ec9", "#f59f00", "#0c8599", "#868e96"]
_STYLE: Any = {  # matplotlib's rcParams keys are typed as literals
    "svg.fonttype": "none",
    "svg.hashsalt": "billing-jobs",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#dde1e6",
    "axes.axisbelow": True,
}


def _figure() -> tuple[Figure, Any]:
    """Every chart the same size with the same margins (room on the right for a legend),
    so charts side by side line up."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    fig.subplots_adjust(left=0.14, right=0.76, bottom=0.2, top=0.9)
    return fig, ax


def _svg(fig: Figure) -> str:
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = out.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF about the file only
    return text[text.index("<svg") :]  # inline: no XML declaration or doctype


def stacked_bars(
    title: str,
    periods: Sequence[str],
    series: Mapping[str, Sequence[int]],
    *,
    units: bool = True,
    ylabel: str = "credits",
) -> str:
    """Bars per period, one stacked segment per series (positive values)."""
    with plt.rc_context(_STYLE):
        fig, ax = _figure()
        bottom = [0.0] * len(periods)
        for i, (name, values) in enumerate(series.items()):
            heights = [v / UNITS_PER_CREDIT if units else float(v) for v in values]
            ax.bar(list(periods), heights, bottom=bottom, label=name, color=PALETTE[i % len(PALETTE)])
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=45)
        if not units:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        return _svg(fig)


def grouped_bars(title: str, periods: Sequence[str], series: Mapping[str, Sequence[int]]) -> str:
    """Bars per period side by side, one per series (credits)."""
    with plt.rc_context(_STYLE):
        fig, ax = _figure()
        width = 0.8 / max(len(series), 1)
        xs = range(len(periods))
        for i, (name, values) in enumerate(series.items()):
            ax.bar(
                [x + (i - (len(series) - 1) / 2) * width for x in xs],
                [v / UNITS_PER_CREDIT for v in values],
                width=width,
                label=name,
                color=PALETTE[i % len(PALETTE)],
            )
        ax.set_xticks(list(xs), list(periods), rotation=45)
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel("credits")
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        return _svg(fig)
