"""Loss-curve PNGs (matplotlib, the optional `plot` extra): RUN_DIR/loss.png for a run, and the overlay
of `gptspec runs compare`. Without matplotlib the run goes on and says so once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from . import metrics

PNG = "loss.png"
_told = False


def _pyplot(note: Callable[[str], None] | None):
    global _told
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        if note and not _told:
            note("matplotlib is not installed, so no loss-curve PNG is drawn (pip install 'gptspec[plot]')")
        _told = True
        return None
    return plt


def _curves(ax, records, label: str, color=None) -> None:
    steps, evals = metrics.steps(records), metrics.evals(records)
    if steps:
        line, = ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.8, color=color,
                        label=f"{label} train")
        color = line.get_color()
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", lw=1.5, ms=3, color=color,
                label=f"{label} val")


def plot_run(run_dir: Path, note: Callable[[str], None] | None = None) -> Path | None:
    plt = _pyplot(note)
    if plt is None:
        return None
    run_dir = Path(run_dir)
    records = metrics.read(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _curves(ax, records, run_dir.name)
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=f"{run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, run_dir / PNG)


def plot_compare(run_dirs: Sequence[Path], out: Path, note: Callable[[str], None] | None = None) -> Path | None:
    plt = _pyplot(note)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for d in run_dirs:
        _curves(ax, metrics.read(Path(d)), Path(d).name)
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="gptspec runs compare")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, Path(out))


def _save(fig, plt, path: Path) -> Path:
    from ..weights.atomic import atomic_write

    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
