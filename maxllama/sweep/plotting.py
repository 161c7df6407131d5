"""One way to draw a figure: a row (or grid) of panels, saved as a PNG and closed whatever happens."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def figure(path: Path, panels: int = 1, panel_size: tuple[float, float] = (6.0, 4.5), *, columns: int | None = None,
           dpi: int = 110, layout_rect: tuple[float, float, float, float] | None = None, **subplots) -> Iterator:
    """Yields (figure, axes: a flat list of `panels` panels, `columns` per row) and saves to `path` on exit.
    matplotlib loads here, on first use, with a backend that needs no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = columns or panels
    rows = -(-panels // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows), squeeze=False,
                             **subplots)
    axes = [ax for row in grid for ax in row]
    for extra in axes[panels:]:
        extra.axis("off")
    try:
        yield fig, axes[:panels]
        fig.tight_layout(**({"rect": layout_rect} if layout_rect else {}))
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def finish(ax, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
           legend_size: int | None = 8) -> None:
    """The labels, a light grid and (unless legend_size is None) a legend: what every panel ends with."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_size:
        ax.legend(fontsize=legend_size)
