"""Language mixtures: named presets or explicit specs, sampled from the corpus to a budget.

A mixture maps language → share (shares sum to 1). `sample_mixture` draws whole paragraphs per
language, in a seeded random order, until each language reaches `share × budget` units, where a unit is
whatever `measure` counts (tokens of a tokenizer, or characters before a tokenizer exists).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from training.errors import UserError

MAJOR_LANGS = ["en", "fr", "de", "es", "ru", "zh"]
LOW_RESOURCE_LANG = "eu"

PRESETS: dict[str, dict[str, float]] = {
    # ≈90% English, the rest shared by the other major languages (the typical web-crawl skew).
    "en-heavy": {"en": 0.90, **{lang: 0.02 for lang in MAJOR_LANGS if lang != "en"}},
    "balanced": {lang: 1 / len(MAJOR_LANGS) for lang in MAJOR_LANGS},
    # Seed 003 trained a model without English to see whether the shared space survives.
    "no-en": {lang: 1 / (len(MAJOR_LANGS) - 1) for lang in MAJOR_LANGS if lang != "en"},
    # Every language of the default corpus alike, Basque included: what a CLT of any model is trained on.
    "balanced+eu": {lang: 1 / (len(MAJOR_LANGS) + 1) for lang in [*MAJOR_LANGS, LOW_RESOURCE_LANG]},
    # English-heavy with Basque scarce (1.5%): the starting point for low-resource adaptation.
    "en-heavy+eu": {
        "en": 0.885,
        **{lang: 0.02 for lang in MAJOR_LANGS if lang != "en"},
        LOW_RESOURCE_LANG: 0.015,
    },
}

_SUM_TOLERANCE = 1e-3


class MixtureError(UserError):
    """A mixture spec the corpus cannot serve (unknown preset or language, bad shares, too little text)."""


def parse_mixture(spec: str) -> dict[str, float]:
    """A preset name (`en-heavy`, `balanced`, `no-en`, `en-heavy+eu`, `balanced+eu`) or a spec like
    `en=0.5,fr=0.2,de=0.3`."""
    spec = spec.strip()
    if spec in PRESETS:
        return dict(PRESETS[spec])
    if "=" not in spec:
        raise MixtureError(
            f"unknown mixture {spec!r}: use a preset {sorted(PRESETS)} or a spec like en=0.5,fr=0.5"
        )
    shares: dict[str, float] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        lang, _, value = item.partition("=")
        lang = lang.strip()
        try:
            share = float(value)
        except ValueError:
            raise MixtureError(f"share for {lang!r} is not a number: {value!r} (in {spec!r})") from None
        if lang in shares:
            raise MixtureError(f"language {lang!r} appears twice in {spec!r}")
        if share <= 0:
            raise MixtureError(f"share for {lang!r} must be positive, got {share}")
        shares[lang] = share
    total = sum(shares.values())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise MixtureError(f"shares in {spec!r} sum to {total:.4f}, not 1")
    return shares


def validate_languages(mixture: dict[str, float], available: Sequence[str]) -> None:
    unknown = sorted(set(mixture) - set(available))
    if unknown:
        raise MixtureError(f"mixture asks for {unknown}, but the corpus has only {sorted(set(available))}")


@dataclass
class MixtureSample:
    indices: list[int]  # rows of the source dataset, grouped by language, in sampled order
    units: dict[str, int]  # measured units drawn per language
    targets: dict[str, int]  # units asked for per language
    budget: int = 0  # the budget the sample was drawn at (lower than asked when fitted to the corpus)

    def shares(self) -> dict[str, float]:
        total = sum(self.units.values())
        return {lang: n / total for lang, n in self.units.items()}


def sample_mixture(
    texts: Sequence[str],
    langs: Sequence[str],
    mixture: dict[str, float],
    budget: int,
    measure: Callable[[list[str]], list[int]],
    seed: int = 0,
    unit_name: str = "tokens",
    chunk_size: int = 512,
    fit: bool = False,
) -> MixtureSample:
    """Draw paragraphs (by row index) so that language `l` gets ≈ `mixture[l] × budget` units.

    If a language lacks the text to reach its share: raises MixtureError saying how much it has, or with
    `fit`, draws again at the largest budget every language can supply at its share (the shares stay
    exact; each language's stream is a prefix of the same shuffled rows, so the result is deterministic).
    """
    lengths: dict[int, int] = {}  # row → measured units, shared by the two draws: nothing is measured twice
    try:
        return _sample_mixture(texts, langs, mixture, budget, measure, seed, unit_name, chunk_size, lengths)
    except ShortLanguageError as short:
        if not fit:
            raise
        return _sample_mixture(
            texts, langs, mixture, short.largest_budget, measure, seed, unit_name, chunk_size, lengths
        )


class ShortLanguageError(MixtureError):
    """A language lacks the text for its share; `largest_budget` is the most every language supplies."""

    def __init__(self, message: str, largest_budget: int):
        super().__init__(message)
        self.largest_budget = largest_budget


def _sample_mixture(
    texts: Sequence[str],
    langs: Sequence[str],
    mixture: dict[str, float],
    budget: int,
    measure: Callable[[list[str]], list[int]],
    seed: int,
    unit_name: str,
    chunk_size: int,
    lengths: dict[int, int],
) -> MixtureSample:
    if budget <= 0:
        raise MixtureError(f"budget must be positive, got {budget}")
    if len(texts) != len(langs):
        raise MixtureError(f"{len(texts)} texts but {len(langs)} language labels")
    if not texts:
        raise MixtureError("the corpus split is empty")
    validate_languages(mixture, langs)
    rows_by_lang: dict[str, list[int]] = {}
    for row, lang in enumerate(langs):
        rows_by_lang.setdefault(lang, []).append(row)

    indices: list[int] = []
    units: dict[str, int] = {}
    targets: dict[str, int] = {}
    short: list[tuple[str, float, int, int]] = []  # (language, share, drawn, target)
    for lang, share in sorted(mixture.items()):
        target = int(round(share * budget))
        targets[lang] = target
        rows = list(rows_by_lang[lang])
        random.Random(f"{seed}:{lang}").shuffle(
            rows
        )  # per-language stream: adding a language never reshuffles another
        drawn, taken = 0, 0
        while drawn < target and taken < len(rows):
            chunk = rows[taken : taken + chunk_size]
            new = [r for r in chunk if r not in lengths]
            if new:
                lengths.update(zip(new, measure([texts[r] for r in new])))
            for row, length in zip(chunk, [lengths[r] for r in chunk]):
                if drawn >= target:
                    break
                indices.append(row)
                drawn += length
                taken += 1
        if drawn < target:
            short.append((lang, share, drawn, target))
        units[lang] = drawn
    if short:
        lang, share, drawn, target = min(short, key=lambda s: s[2] / s[1])  # the binding language
        largest = int(drawn / share)
        raise ShortLanguageError(
            f"mixture asks for {target:,} {unit_name} of {lang!r} ({share:.1%} of {budget:,}), but the "
            f"corpus has only {drawn:,} {unit_name} of {lang!r}. Lower the budget to at most {largest:,} "
            "or the share.",
            largest,
        )
    return MixtureSample(indices=indices, units=units, targets=targets, budget=budget)


def count_chars(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]
