"""p(language | token) from token counts in the corpus — the soft logit lens's token→language table.

Counts are normalised per language first (each language's counts divided by its total tokens), so a
language that dominates the corpus does not claim every shared token:

    p(lang | t) = (c_lang(t) / N_lang + α/V) / Σ_lang' (c_lang'(t) / N_lang' + α/V)

With α > 0 a token never seen in the corpus gets the uniform distribution (the lens then says
"no language" for it rather than guessing).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def token_counts(tokenizer, texts_by_lang: dict[str, list[str]]) -> Float[Tensor, "vocab lang"]:
    langs = list(texts_by_lang)
    counts = torch.zeros(len(tokenizer), len(langs), dtype=torch.float64)
    for k, lang in enumerate(langs):
        texts = texts_by_lang[lang]
        if not texts:
            raise ValueError(f"no text for language {lang!r}")
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            counts[:, k] += torch.bincount(
                torch.tensor(ids, dtype=torch.long), minlength=len(tokenizer)
            ).double()
    return counts


def language_table(
    counts: Float[Tensor, "vocab lang"], smoothing: float = 1.0
) -> Float[Tensor, "vocab lang"]:
    totals = counts.sum(0)
    if (totals == 0).any():
        raise ValueError("a language has no tokens at all: cannot normalise its counts")
    rates = counts / totals + smoothing / counts.shape[0]
    return (rates / rates.sum(1, keepdim=True)).float()


def corpus_texts_by_lang(
    corpus_dir, langs: list[str], split: str = "train", max_texts: int = 4000, seed: int = 0
) -> dict[str, list[str]]:
    """Up to `max_texts` paragraphs per language from the corpus (seeded sample)."""
    import random

    from analysis.text_blocks import texts_by_lang
    from training.corpus.build import default_corpus_dir, load_corpus

    by_lang = texts_by_lang(load_corpus(corpus_dir or default_corpus_dir())[split], langs)
    rng = random.Random(seed)
    return {lang: rng.sample(texts, min(max_texts, len(texts))) for lang, texts in by_lang.items()}
