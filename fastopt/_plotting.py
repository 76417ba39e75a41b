"""The one way fastopt draws: a matplotlib Figure on the Agg canvas (no pyplot state, no window,
whatever backend the user's matplotlib has), with matplotlib imported only when a plot is drawn."""

from __future__ import annotations

from typing import Any


def agg_figure(what: str, **figure_kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` attached to an Agg canvas, ready for ``savefig``; ``what``
    names the function that draws, for the error raised when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"{what} needs matplotlib to draw its PNG, an optional dependency of fastopt: pip install 'fastopt[plot]'"
        ) from err
    fig = Figure(**figure_kwargs)
    FigureCanvasAgg(fig)
    return fig
