"""The heatmap of a comparison: tensor x comparison, error / bound on a log color scale.

Needs matplotlib (`pip install 'gptspec[plot]'`); importing this module without it raises
ImportError, which conformance/report.py turns into a note. Never imported by `import gptspec`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

LOW, HIGH = 1e-3, 1e3   # ratio 1 (at the bound) sits in the middle of the color scale


def heatmap(path: Path, title: str, tensors: list[str], subjects: list[str], cells: dict) -> Path:
    """cells: {(tensor, subject): Check}. Green below the bound, red above; an x marks a failure,
    a grey cell a comparison that did not happen; NaN, Inf or a missing tensor show at the top."""
    ratio = np.full((len(tensors), len(subjects)), np.nan)
    for (t, s), c in cells.items():
        r = c.worst_ratio
        ratio[tensors.index(t), subjects.index(s)] = HIGH if math.isinf(r) or math.isnan(r) else max(r, LOW)
    fig = Figure(figsize=(3.0 + 1.1 * len(subjects), 1.6 + 0.2 * len(tensors)), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn_r"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(ratio), cmap=cmap, norm=LogNorm(LOW, HIGH, clip=True), aspect="auto")
    for (t, s), c in cells.items():
        if not c.ok:
            ax.text(subjects.index(s), tensors.index(t), "x", ha="center", va="center", fontsize=8, weight="bold")
    ax.set_xticks(range(len(subjects)), subjects, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tensors)), tensors, fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="error / bound (worst of rel_l2, rel_max); > 1 fails")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
