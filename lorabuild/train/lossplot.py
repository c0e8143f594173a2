"""The loss curve of a train run (``output/<name>/loss.png``), drawn when the run is published
(:mod:`lorabuild.train.publish`) and listed by ``lorabuild report``: below both, so publishing never
imports a command."""
from __future__ import annotations

from pathlib import Path

from ..cache import atomic_path


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_plot(rows: list, out: Path, title: str, val: list | None = None) -> None:
    """Loss per step (faint), its running mean, the validation loss per epoch (when held-out
    images exist), and the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    loss = [r[2] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    window = max(1, len(rows) // 20)
    ax.plot(steps, running_mean(loss, window), color="tab:blue", linewidth=1.6, label=f"mean of {window}")
    # epoch boundaries
    for (s0, e0, *_), (s1, e1, *_) in zip(rows, rows[1:]):
        if e1 != e0:
            ax.axvline(s0 + 0.5, color="grey", linewidth=0.5, alpha=0.5)
    if val:
        ax.plot([v[1] for v in val], [v[2] for v in val], "o-", color="tab:red", linewidth=1.4, markersize=4,
                label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(steps, [r[3] for r in rows], color="tab:orange", linewidth=1.0, label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")] + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
