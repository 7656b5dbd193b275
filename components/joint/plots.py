"""`joint.png`: a joint run's training loss and staleness recall@k over steps, refreshes marked.

The staleness panel shares the loss panel's step axis: each refresh shows as a vertical line
where it was submitted (dashed) and where its index was swapped in (solid), so a recall that
climbs back to 1 after a solid line is the refresh taking effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_run(steps: Sequence[dict[str, Any]], staleness: Sequence[dict[str, Any]],
             refreshes: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write the two-panel plot; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    x = [i + 1 for i in range(len(steps))]
    top.plot(x, [r["reader_loss"] for r in steps], label="reader loss", linewidth=1.2)
    top.plot(x, [r["retriever_loss"] for r in steps], label="retriever loss", linewidth=1.2)
    top.set_ylabel("loss")
    top.legend(fontsize=7)
    if staleness:
        bottom.plot([r["step"] for r in staleness], [r["recall"] for r in staleness],
                    marker="o", markersize=3, linewidth=1.2, label="staleness recall@k")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("probe recall@k")
    bottom.set_xlabel("step")
    for i, r in enumerate(refreshes):
        for ax in (top, bottom):
            ax.axvline(r["snapshot_step"], color="grey", linestyle="--", linewidth=0.8,
                       label="refresh submitted" if (i == 0 and ax is bottom) else None)
            if r["swapped_before_step"] is not None:       # None: awaited after the end
                ax.axvline(r["swapped_before_step"] - 0.5, color="black", linewidth=0.8,
                           label="index swapped in" if (i == 0 and ax is bottom) else None)
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title or "joint training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
