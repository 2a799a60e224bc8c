"""Figures people look at (loss curves, confusion matrices): drawn off-screen, saved as PNG
atomically (llm.files.atomic_output). matplotlib is imported only when a figure is made."""

from __future__ import annotations

import os

from llm.files import atomic_output


def new_figure(*args, **kwargs):
    """plt.subplots(*args, **kwargs) -> (figure, axes), on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_png(figure, path: str | os.PathLike) -> None:
    """Write the (laid out) figure to `path` as a PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
