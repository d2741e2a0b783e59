"""Pictures: training loss curves and base-vs-adapter metric bars (matplotlib, optional)."""
import os
from typing import Any

from .metrics import read_metrics, train_rows, validation_rows


def _pyplot() -> Any:  # matplotlib.pyplot, or None without the plot extra
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: dict[str, str], png_path: str | os.PathLike[str],
                title: str = "LoRA finetuning") -> str | os.PathLike[str] | None:
    """runs: {label: metrics.jsonl path}. Train loss per step (solid), validation loss per epoch (dots)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, (label, path) in enumerate(runs.items()):
        rows = read_metrics(path)
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in train_rows(rows)]
        val = [(r["step"], r["val_loss"]) for r in validation_rows(rows)]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{label} validation")
    ax.set(xlabel="optimizer step", ylabel="loss (cross-entropy per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def plot_metrics(rows: list[tuple[str, str, float, float]], png_path: str | os.PathLike[str],
                 title: str = "Base model vs LoRA adapter") -> str | os.PathLike[str] | None:
    """rows: [(task, metric name, base score, adapter score)] as grouped bars, scores in [0, 1]."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    xs = range(len(rows))
    base = ax.bar([x - 0.2 for x in xs], [r[2] for r in rows], 0.4, label="base model", color="C7")
    tuned = ax.bar([x + 0.2 for x in xs], [r[3] for r in rows], 0.4, label="LoRA adapter", color="C0")
    for bars in (base, tuned):
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(xs), [f"{r[0]}\n({r[1]})" for r in rows])
    ax.set(ylim=(0, 1.25), ylabel="score", title=title)  # headroom: the legend sits above the bars
    ax.set_yticks([i / 5 for i in range(6)])
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
