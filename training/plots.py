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


def plot_scaling(reads: list[dict], path: Path, title: str = "") -> None:
    """Held-out nats/char against the wall-clock budget, one line per shape (left: mean over the
    mixture's languages; right: each language, one panel line style per shape)."""
    shapes = list(dict.fromkeys(r["shape"] for r in reads))
    langs = sorted({lang for r in reads for lang in r["nats_per_char"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, shape in enumerate(shapes):
        rows = sorted((r for r in reads if r["shape"] == shape), key=lambda r: r["minutes"])
        minutes = [r["minutes"] for r in rows]
        label = f"{shape} ({rows[0]['parameters'] / 1e6:.1f}M)"
        left.plot(minutes, [r["mean_nats_per_char"] for r in rows], marker="o", label=label)
        for j, lang in enumerate(langs):
            right.plot(
                minutes,
                [r["nats_per_char"][lang] for r in rows],
                linestyle=styles[i % len(styles)],
                color=colors[j % len(colors)],
                marker="o",
                ms=3,
                label=lang if i == 0 else None,
            )
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("budget (minutes of the idle 2-core machine)")
        ax.grid(alpha=0.3)
    left.set_ylabel("held-out nats per character (mean over languages)")
    right.set_ylabel("held-out nats per character")
    right.set_title("per language (line style = shape, in the left panel's order)")
    left.set_title(title)
    left.legend(fontsize=8)
    right.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
