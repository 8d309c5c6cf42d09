"""Matplotlib figures for training runs (headless backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(metrics: list[dict], path: Path, title: str = "") -> None:
    """Training loss and validation loss per language against tokens seen."""
    train = [r for r in metrics if r.get("split") == "train"]
    val = [r for r in metrics if r.get("split") == "validation"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(
            [r["tokens"] / 1e6 for r in train],
            [r["loss"] for r in train],
            color="0.6",
            lw=1,
            label="train (mixture)",
        )
    langs = sorted({k.split("/", 1)[1] for r in val for k in r if k.startswith("loss/")})
    for lang in langs:
        points = [(r["tokens"] / 1e6, r[f"loss/{lang}"]) for r in val if f"loss/{lang}" in r]
        ax.plot(*zip(*points), marker="o", ms=3, label=f"val {lang}")
    ax.set_xlabel("tokens trained (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
