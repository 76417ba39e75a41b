"""PNG line plots of scheduler histories; matplotlib is optional and imported only here, when asked."""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

from .._plotting import agg_figure

Series = Tuple[Sequence[float], Sequence[float], str]  # x, y, label


def save_line_plot(
    path: str,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    what: str,
    log_y: Optional[bool] = None,
) -> str:
    """Draw ``series`` into a PNG at ``path`` and return the path.

    A Figure with the Agg canvas, not pyplot: no GUI backend, no global state left behind.
    ``log_y=None`` uses a log scale when every finite value is positive.
    """
    fig = agg_figure(what, figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    values = [y for _, ys, _ in series for y in ys if math.isfinite(y)]
    for xs, ys, label in series:
        ax.plot(list(xs), list(ys), label=label, marker="." if len(xs) < 50 else None)
    if log_y is None:
        log_y = bool(values) and min(values) > 0
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    ax.grid(True, alpha=0.3)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return path
