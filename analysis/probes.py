"""Linear probes of language identity (docs/methods.md §4): multinomial logistic regression from per-token
representations — the token embedding, the residual after each layer, or each layer's CLT features —
to the language of the text. Train and test tokens come from different blocks (no block contributes
to both), features are standardised on the training split, and the fit is full-batch L-BFGS with a
small L2 penalty. Reported: held-out accuracy, and the majority-class baseline next to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def fit_probe(
    x_train: Float[Tensor, "n d"],
    y_train: Int[Tensor, " n"],
    x_test: Float[Tensor, "m d"],
    y_test: Int[Tensor, " m"],
    n_classes: int,
    l2: float = 1e-3,
    max_iter: int = 200,
    seed: int = 0,
) -> dict:
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("empty probe training or test set")
    if not (torch.isfinite(x_train).all() and torch.isfinite(x_test).all()):
        raise ValueError("probe inputs contain NaN or inf")
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(seed)
    weight = torch.zeros(x_train.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_acc = float(((x_train @ weight + bias).argmax(1) == y_train).float().mean())
        test_acc = float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())
    majority = float((y_test == torch.bincount(y_train, minlength=n_classes).argmax()).float().mean())
    return {"train_accuracy": train_acc, "test_accuracy": test_acc, "majority_baseline": majority}


def split_by_block(n_blocks: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(test_fraction * n_blocks))
    return order[n_test:], order[:n_test]


@torch.no_grad()
def language_probes(
    model,
    blocks: Int[Tensor, "n pos"],
    block_langs: list[str],
    langs: list[str],
    clt=None,
    tokens_per_block: int = 16,
    test_fraction: float = 0.3,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Probe accuracy per layer from residuals (and CLT features if a CLT is given), plus the token
    embedding as a baseline: how much of "language" is already token identity."""
    from analysis.language_features import clt_features
    from analysis.residuals import residual_stream

    unknown = sorted(set(block_langs) - set(langs))
    if unknown:
        raise ValueError(f"blocks in languages {unknown} that are not among {langs}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    positions = torch.stack(
        [
            1 + torch.randperm(blocks.shape[1] - 1, generator=generator)[:tokens_per_block]
            for _ in range(len(blocks))
        ]
    )
    labels = torch.tensor([langs.index(l) for l in block_langs])
    reps: dict[str, list[Tensor]] = {}
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        pos = positions[start : start + batch_size]
        rows = torch.arange(len(ids))[:, None]
        embedding = model.transformer.wte(ids).cpu()
        reps.setdefault("embedding", []).append(embedding[rows, pos])
        hidden = residual_stream(model, ids).cpu()
        for layer in range(hidden.shape[0]):
            reps.setdefault(f"residual_{layer}", []).append(hidden[layer][rows, pos])
        if clt is not None:
            acts = clt_features(model, clt, ids).cpu()
            for layer in range(acts.shape[0]):
                reps.setdefault(f"clt_{layer}", []).append(acts[layer][rows, pos])
    train_blocks, test_blocks = split_by_block(len(blocks), test_fraction, seed)
    y = labels[:, None].expand(-1, positions.shape[1])
    results = {}
    for name, chunks in reps.items():
        x = torch.cat(chunks).float()  # [blocks, tokens, dim]
        results[name] = fit_probe(
            x[train_blocks].flatten(0, 1),
            y[train_blocks].flatten(),
            x[test_blocks].flatten(0, 1),
            y[test_blocks].flatten(),
            len(langs),
            seed=seed,
        )
    return {
        "langs": langs,
        "tokens_per_block": tokens_per_block,
        "n_train_blocks": len(train_blocks),
        "n_test_blocks": len(test_blocks),
        "probes": results,
    }


def plot_probes(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = report["probes"]
    residual = sorted(
        (int(k.split("_")[1]), v["test_accuracy"]) for k, v in p.items() if k.startswith("residual_")
    )
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([l for l, _ in residual], [a for _, a in residual], "-o", label="residual after layer")
    clt_rows = sorted(
        (int(k.split("_")[1]), v["test_accuracy"]) for k, v in p.items() if k.startswith("clt_")
    )
    if clt_rows:
        ax.plot([l for l, _ in clt_rows], [a for _, a in clt_rows], "-s", label="CLT features of layer")
    ax.axhline(p["embedding"]["test_accuracy"], color="gray", linestyle=":", label="token embedding")
    ax.axhline(p["residual_0"]["majority_baseline"], color="black", linestyle="--", label="majority class")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
