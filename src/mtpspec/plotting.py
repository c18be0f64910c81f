"""matplotlib for the plots the package writes (benchmarks, serving load tests, training curves)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
