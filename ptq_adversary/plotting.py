"""Matplotlib for the report and audit figures: imported on first use, headless (Agg).

matplotlib is an optional dependency of the library's core (training and the audit's numbers
need none of it), so it is imported only when a figure is drawn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]

#: Figure defaults shared by every figure the project writes.
STYLE = {"figure.dpi": 110, "font.size": 9, "axes.titlesize": 10}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, with :data:`STYLE` applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt
