"""Language features found by their output effect (seed 003's output alignment; docs/methods.md §8).

A CLT feature of layer l writes its decoder rows into layers l … L−1; summed, they are the direction it
adds to the residual stream that reaches the unembedding. Through the final LayerNorm (centring, its
weight γ, and a positive scale 1/σ that does not change rankings) and W_U, that direction raises some
tokens' logits and lowers others'. A feature is a language's output feature when it raises the tokens
specific to that language more than the other languages' tokens:

    effect_f = W_U (γ ⊙ centre(Σ_k W_dec[f, k]))                      (per token, in logit units × σ)
    score_f(L) = mean_{t ∈ T_L} effect_f[t] − mean_{L' ≠ L} mean_{t ∈ T_L'} effect_f[t]

T_L: tokens that occur mostly in language L's text (p(L | t) ≥ `min_share`, counted over many translated
paragraphs, at least `min_count` times) — a language direction built from many words, not one.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from analysis.token_language import language_table, token_counts
from clt.export import folded_weights
from clt.model import CrossLayerTranscoder
from training.errors import UserError


def written_directions(clt: CrossLayerTranscoder) -> Float[Tensor, "layer feature d_model"]:
    """Each feature's decoder rows summed over the layers it writes to, in the model's units."""
    return torch.stack([w.sum(1) for w in folded_weights(clt)["W_dec"]])


def logit_directions(model, directions: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """Residual directions as the unembedding sees them through ln_f: centred, times its weight."""
    ln_weight = model.transformer.ln_f.weight.detach().cpu().float()
    return (directions - directions.mean(-1, keepdim=True)) * ln_weight


def language_token_weights(
    tokenizer, texts_by_lang: dict[str, list[str]], min_share: float = 0.8, min_count: int = 3
) -> Float[Tensor, "vocab lang"]:
    """Column L: 1/|T_L| on the tokens specific to language L (see the module docstring), else 0."""
    counts = token_counts(tokenizer, texts_by_lang)
    table = language_table(counts)
    specific = (table >= min_share) & (counts >= min_count)
    empty = [lang for k, lang in enumerate(texts_by_lang) if not specific[:, k].any()]
    if empty:
        raise UserError(
            f"no token is specific to {empty} in the translated text (p(lang | token) ≥ {min_share}, "
            f"≥ {min_count} occurrences): give more text, or lower --token-min-share / --token-min-count"
        )
    weights = specific.float()
    return weights / weights.sum(0, keepdim=True)


def language_readouts(model, token_weights: Float[Tensor, "vocab lang"]) -> Float[Tensor, "lang d_model"]:
    """Per language, the direction at the final residual (after ln_f) that reads "L rather than the
    others": W_Uᵀ (w_L − mean of the other languages' w), w_L = column L of `token_weights`."""
    W_U = model.lm_head.weight.detach().cpu().float()  # [vocab, d]
    n_langs = token_weights.shape[1]
    others = (token_weights.sum(1, keepdim=True) - token_weights) / max(1, n_langs - 1)
    return (W_U.T @ (token_weights - others)).T


@torch.no_grad()
def output_scores(
    model, clt: CrossLayerTranscoder, token_weights: Float[Tensor, "vocab lang"]
) -> Float[Tensor, "layer feature lang"]:
    """Every feature's margin for every language (module docstring)."""
    directions = logit_directions(model, written_directions(clt))  # [layer, feature, d]
    return directions @ language_readouts(model, token_weights).T


def rank_output_features(
    scores: Float[Tensor, "layer feature lang"], langs: list[str], per_lang: int = 10
) -> dict[str, list[dict]]:
    """The `per_lang` features with the largest positive margin for each language, best first."""
    ranked = {}
    n_features = scores.shape[1]
    for k, lang in enumerate(langs):
        flat = scores[..., k].flatten()
        top = flat.topk(min(per_lang, flat.numel()))
        ranked[lang] = [
            {"layer": index // n_features, "feature": index % n_features, "score": value}
            for value, index in zip(top.values.tolist(), top.indices.tolist())
            if value > 0
        ]
    return ranked
