"""Cross-lingual similarity of hidden states per layer on parallel text (LinguaMap, docs/methods.md §4).

Every paragraph of the held-out parallel set is encoded in each language; hidden states are mean-pooled
over its tokens (BOS excluded) at every layer. For each language pair:
- cosine of parallel pairs (same paragraph) and of non-parallel pairs (paragraph i vs j ≠ i);
- the same after centring (subtracting, per layer and language, the mean pooled vector over all
  paragraphs): residual streams are anisotropic and carry a per-language offset, which raw cosine
  mixes with meaning;
- the gap parallel − non-parallel (raw and centred), the quantity that says "same meaning is closer".
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from analysis.residuals import mean_pool, residual_stream


@torch.no_grad()
def pooled_states(
    model, tokenizer, texts: list[str], max_tokens: int = 64, batch_size: int = 16
) -> Float[Tensor, "layer text d"]:
    """Mean-pooled residual after every layer for each text (BOS + at most max_tokens−1 tokens)."""
    device = next(model.parameters()).device
    encoded = [
        [tokenizer.bos_token_id] + ids[: max_tokens - 1]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    pooled = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        hidden = residual_stream(model, ids.to(device), mask.to(device))  # right padding: causal, no leak
        pool_mask = mask.clone()
        pool_mask[:, 0] = 0  # BOS is the same token in every language
        pooled.append(mean_pool(hidden.float().cpu(), pool_mask))
    return torch.cat(pooled, dim=1)


def pair_similarities(a: Float[Tensor, "layer n d"], b: Float[Tensor, "layer n d"]) -> dict[str, list[float]]:
    """Per layer: mean cosine of parallel pairs (i, i) and of non-parallel pairs (i, j ≠ i)."""
    n = a.shape[1]
    if n < 2:
        raise ValueError("need at least two parallel paragraphs (non-parallel pairs need i ≠ j)")
    cos = F.cosine_similarity(a[:, :, None, :], b[:, None, :, :], dim=-1)  # [L, n, n]
    eye = torch.eye(n, dtype=torch.bool)
    parallel = cos[:, eye].mean(1)
    non_parallel = cos[:, ~eye].mean(1)
    return {
        "parallel": parallel.tolist(),
        "non_parallel": non_parallel.tolist(),
        "gap": (parallel - non_parallel).tolist(),
    }


def similarity_report(states: dict[str, Float[Tensor, "layer n d"]]) -> dict:
    """`states[lang]`: pooled states of the same n paragraphs (same order) in each language."""
    langs = sorted(states)
    centred = {lang: s - s.mean(1, keepdim=True) for lang, s in states.items()}
    report = {"langs": langs, "n_paragraphs": states[langs[0]].shape[1], "pairs": {}}
    for a, b in itertools.combinations(langs, 2):
        raw, cen = pair_similarities(states[a], states[b]), pair_similarities(centred[a], centred[b])
        report["pairs"][f"{a}-{b}"] = {"raw": raw, "centred": cen}
    for kind in ("raw", "centred"):
        for key in ("parallel", "non_parallel", "gap"):
            values = np.array([p[kind][key] for p in report["pairs"].values()])
            report.setdefault("mean", {}).setdefault(kind, {})[key] = values.mean(0).tolist()
    gap = report["mean"]["centred"]["gap"]
    report["centred_gap_peak_layer"] = int(np.argmax(gap))
    return report


def plot_similarity(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, kind in zip(axes, ("raw", "centred")):
        mean = report["mean"][kind]
        layers = np.arange(len(mean["gap"]))
        ax.plot(layers, mean["parallel"], "-o", label="parallel pairs")
        ax.plot(layers, mean["non_parallel"], "--s", label="non-parallel pairs")
        ax.plot(layers, mean["gap"], "-^", label="gap")
        ax.set_title(f"{kind} cosine (mean over {len(report['pairs'])} language pairs)", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
