"""Token blocks of one language's text, shared by the location, steering and fine-tuning tools."""

from __future__ import annotations

import torch

from clt.activations import bos_blocks
from training.corpus.build import unknown_language_message
from training.errors import UnknownLanguage


def evaluation_half(texts: list[str]) -> list[str]:
    """The first half of a language's parallel-split paragraphs: steering's evaluation prompts."""
    return texts[: (len(texts) + 1) // 2]


def selection_half(texts: list[str]) -> list[str]:
    """The second half: what unit selection (analysis/feature_selection.py) may read — never the first."""
    return texts[(len(texts) + 1) // 2 :]


def texts_by_lang(split, langs: list[str]) -> dict[str, list[str]]:
    """All texts of a corpus split, grouped by language (only `langs`)."""
    out: dict[str, list[str]] = {lang: [] for lang in langs}
    for text, lang in zip(list(split["text"]), list(split["lang"])):
        if lang in out:
            out[lang].append(text)
    missing = [lang for lang, texts in out.items() if not texts]
    if missing:
        present = sorted(set(split["lang"]))
        raise UnknownLanguage(
            unknown_language_message(missing, present, getattr(split, "split", None) or "given")
        )
    return out


def blocks_by_lang(
    tokenizer, texts: dict[str, list[str]], n_ctx: int, per_lang: int
) -> dict[str, torch.Tensor]:
    """Each language's texts packed into `[BOS] + n_ctx−1 tokens` blocks, at most `per_lang` of them."""
    out = {}
    for lang, lang_texts in texts.items():
        ids = tokenizer(lang_texts, add_special_tokens=False)["input_ids"]
        blocks, _ = bos_blocks(ids, [lang] * len(ids), tokenizer, n_ctx)
        if len(blocks) == 0:
            raise ValueError(f"not enough {lang} text for one block of {n_ctx} tokens")
        out[lang] = blocks[:per_lang]
    return out


def prompt_blocks(tokenizer, texts: list[str], prompt_tokens: int, n: int) -> torch.Tensor:
    """`[BOS] + the first prompt_tokens tokens` of the first n texts that are longer than that."""
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) > prompt_tokens:
            rows.append([tokenizer.bos_token_id] + ids[:prompt_tokens])
        if len(rows) == n:
            break
    if not rows:
        raise ValueError(f"no text longer than {prompt_tokens} tokens")
    return torch.tensor(rows)
