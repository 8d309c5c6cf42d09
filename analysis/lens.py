"""Logit-lens language probabilities per layer (LinguaMap, docs/methods.md §4).

At every layer the residual is read through the model's own ln_f + unembedding:
- soft: P^l(lang) = Σ_t softmax(z^l)_t · p(lang | t), averaged over the (non-BOS) positions of text in
  each prompt language (p(lang | t) from `analysis.token_language`);
- word: the lens's top-1 token at every position, decoded as one string per text and layer, judged by
  the language identifier (CLD2); the share of texts detected as each language (and as unknown).
For text in language X the next token is (mostly) in X, so P^l(X) is the probability the model's
layer-l state already "speaks" the right language.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from analysis.residuals import lens_logits, residual_stream
from training import langid


@torch.no_grad()
def lens_language_probabilities(
    model,
    blocks: Int[Tensor, "blocks pos"],
    table: Float[Tensor, "vocab lang"],
    tokenizer=None,
    batch_size: int = 16,
) -> tuple[Float[Tensor, "blocks layer lang"], list[list[str]]]:
    """Soft lens probabilities per block and layer (mean over positions 1…), and, if a tokenizer is
    given, the decoded top-1 lens string of every block at every layer ([block][layer])."""
    device = next(model.parameters()).device
    table = table.to(device)
    probs, strings = [], []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        hidden = residual_stream(model, ids)  # [L, B, P, d]
        logits = lens_logits(model, hidden[:, :, 1:])  # BOS position predicts the first token: excluded
        p_token = logits.float().softmax(-1)
        probs.append((p_token @ table).mean(2).transpose(0, 1).cpu())  # [B, L, K]
        if tokenizer is not None:
            top = logits.argmax(-1)  # [L, B, P-1]
            for b in range(ids.shape[0]):
                strings.append([tokenizer.decode(top[layer, b].tolist()) for layer in range(top.shape[0])])
    return torch.cat(probs), strings


def lens_report(
    probabilities: Float[Tensor, "blocks layer lang"],
    strings: list[list[str]],
    block_langs: list[str],
    langs: list[str],
) -> dict:
    """Per prompt language: soft P^l(lang) for every lang (mean over blocks), the word-level detected
    shares per layer, and the first layer at which the prompt's own language leads (soft)."""
    report = {"langs": langs, "n_layers": probabilities.shape[1], "by_prompt_lang": {}}
    for lang in langs:
        rows = [i for i, l in enumerate(block_langs) if l == lang]
        if not rows:
            continue
        soft = probabilities[rows].mean(0).numpy()  # [L, K]
        entry = {"n": len(rows), "soft": {other: soft[:, k].tolist() for k, other in enumerate(langs)}}
        leader = soft.argmax(1)
        own = langs.index(lang)
        # First layer from which the prompt's language leads in every later layer (None: never).
        entry["own_language_leads_from_layer"] = next(
            (
                layer
                for layer in range(len(leader))
                if all(leader[later] == own for later in range(layer, len(leader)))
            ),
            None,
        )
        entry["leader_per_layer"] = [langs[k] for k in leader]
        if strings:
            detected = [
                [langid.detect(strings[i][layer]) for i in rows] for layer in range(probabilities.shape[1])
            ]
            entry["word"] = {
                other: [float(np.mean([d == other for d in per_layer])) for per_layer in detected]
                for other in langs + [langid.UNKNOWN]
            }
        report["by_prompt_lang"][lang] = entry
    return report


def plot_lens(report: dict, path, title: str = "Logit-lens language probability per layer") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_langs = list(report["by_prompt_lang"])
    fig, axes = plt.subplots(
        1, len(prompt_langs), figsize=(3.2 * len(prompt_langs), 3.2), sharey=True, squeeze=False
    )
    layers = np.arange(report["n_layers"])
    for ax, lang in zip(axes[0], prompt_langs):
        entry = report["by_prompt_lang"][lang]
        for other, values in entry["soft"].items():
            ax.plot(layers, values, marker="o", linewidth=2.5 if other == lang else 1, label=other)
        if "word" in entry:
            ax.plot(layers, entry["word"][lang], "k--", linewidth=1, label=f"{lang} (word, CLD2)")
        ax.set_title(f"prompts in {lang}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(language)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
