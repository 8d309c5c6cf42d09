"""What an attribution graph explains: read-out directions on the last position's final residual.

- Salient logits (default): the most likely next tokens until their probabilities sum to 0.95, at
  most 10. Each is the demeaned unembedding column W_U[:, v] − mean_v' W_U[:, v'], so its value is
  logit_v − mean logit (circuit-tracer's convention); its weight for pruning is its probability.
- A chosen token: the same vector for one token, weighted by its probability.
- A custom direction, e.g. a **language direction**: for translations t_lang of the same word
  (Friday / vendredi / Freitag), W_U[:, t_lang] − mean_lang W_U[:, t_lang'] reads "this language
  rather than the others" (Harrasse et al. 2025). A multi-token translation uses its first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class Target:
    label: str
    vector: Float[Tensor, " d"]
    weight: float  # importance for pruning (probability for logit targets)
    vocab_idx: int = -1  # token id for logit targets, -1 for custom directions


def salient_logit_targets(
    logits: Float[Tensor, " vocab"],
    W_U: Float[Tensor, "d vocab"],
    tokenizer=None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> list[Target]:
    probs = logits.double().softmax(-1)
    top_p, top_idx = probs.topk(min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob, dtype=top_p.dtype))) + 1
    mean_unembedding = W_U.mean(dim=1)  # (once: per target it was most of a short prompt's target time)
    return [
        _token_target(int(i), float(probs[i]), W_U, mean_unembedding, tokenizer)
        for i in top_idx[:cutoff].tolist()
    ]


def token_target(
    token_id: int, logits: Float[Tensor, " vocab"], W_U: Float[Tensor, "d vocab"], tokenizer=None
) -> Target:
    if not 0 <= token_id < W_U.shape[1]:
        raise ValueError(f"token id {token_id} is outside the vocabulary (size {W_U.shape[1]})")
    prob = float(logits.double().softmax(-1)[token_id])
    return _token_target(token_id, prob, W_U, W_U.mean(dim=1), tokenizer)


def _token_target(
    token_id: int,
    prob: float,
    W_U: Float[Tensor, "d vocab"],
    mean_unembedding: Float[Tensor, " d"],
    tokenizer,
) -> Target:
    """The logit of `token_id` minus the mean logit (circuit-tracer's target vector), weighted by its
    probability."""
    label = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
    return Target(label=label, vector=W_U[:, token_id] - mean_unembedding, weight=prob, vocab_idx=token_id)


def direction_target(label: str, vector: Float[Tensor, " d"], weight: float = 1.0) -> Target:
    if vector.dim() != 1:
        raise ValueError(
            f"a custom direction must be a 1-D vector of size d_model, got shape {tuple(vector.shape)}"
        )
    if not torch.isfinite(vector).all() or not vector.abs().sum() > 0:
        raise ValueError(f"custom direction {label!r} is zero or not finite")
    return Target(label=label, vector=vector, weight=weight)


def language_direction(
    W_U: Float[Tensor, "d vocab"],
    tokenizer,
    translations: dict[str, str],
    lang: str,
    leading_space: bool = True,
) -> Target:
    """W_U[:, tok_lang] − mean over languages of W_U[:, tok], e.g. translations={"en": "Friday",
    "fr": "vendredi", "de": "Freitag"}, lang="fr". Words are tokenised with a leading space (as they
    appear mid-sentence) unless `leading_space=False`; each word's first token stands for it."""
    if lang not in translations:
        raise ValueError(f"language {lang!r} not among the translations {sorted(translations)}")
    if len(translations) < 2:
        raise ValueError("a language direction needs translations in at least two languages")
    first_tokens = {}
    for language, word in translations.items():
        ids = tokenizer((" " if leading_space else "") + word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"translation {word!r} ({language}) tokenises to nothing")
        first_tokens[language] = ids[0]
    columns = W_U[:, list(first_tokens.values())]
    vector = W_U[:, first_tokens[lang]] - columns.mean(dim=1)
    others = "/".join(w for l, w in translations.items() if l != lang)
    return direction_target(f"lang:{lang} ({translations[lang]} vs {others})", vector)
