"""Independent language identification (CLD2 via `pycld2`), shared by corpus cleaning and by every
evaluation that judges generated text.

Codes are ISO 639-1 as used across the project (`en`, `fr`, `zh`, `eu`, ...). Anything CLD2 cannot
decide comes back as `UNKNOWN`: callers must count it explicitly rather than treat it as a miss or a hit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import pycld2

UNKNOWN = "unknown"

# CLD2 reports some languages with script/region suffixes; fold them onto the project's codes.
_CLD2_ALIASES = {"zh-Hant": "zh", "zh-TW": "zh", "zh-CN": "zh", "iw": "he", "jw": "jv", "un": UNKNOWN}


def _clean_for_cld2(text: str) -> str:
    # CLD2 rejects some control characters and invalid surrogates; drop them rather than fail.
    return (
        "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")
        .encode("utf-8", "ignore")
        .decode("utf-8")
    )


def detect(text: str) -> str:
    """Language code of `text`, or UNKNOWN when CLD2 is not confident or the text is too short."""
    cleaned = _clean_for_cld2(text).strip()
    if not cleaned:
        return UNKNOWN
    try:
        is_reliable, _, details = pycld2.detect(cleaned, bestEffort=True)
    except pycld2.error:
        return UNKNOWN
    code = details[0][1]
    code = _CLD2_ALIASES.get(code, code)
    if code == UNKNOWN or details[0][2] == 0:
        return UNKNOWN
    return code


def detect_many(texts: Iterable[str]) -> list[str]:
    return [detect(t) for t in texts]


def accuracy_by_language(texts: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per labelled language: share detected correctly, share UNKNOWN, count, and top confusions."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    report: dict[str, dict] = {}
    by_lang: dict[str, list[str]] = {}
    for text, label in zip(texts, labels):
        by_lang.setdefault(label, []).append(detect(text))
    for label, predictions in sorted(by_lang.items()):
        counts = Counter(predictions)
        n = len(predictions)
        confusions = {k: v for k, v in counts.most_common() if k not in (label, UNKNOWN)}
        report[label] = {
            "n": n,
            "accuracy": counts[label] / n,
            "unknown": counts[UNKNOWN] / n,
            "confusions": dict(list(confusions.items())[:5]),
        }
    return report


def consistency(texts: Sequence[str], intended: Sequence[str]) -> dict[str, float]:
    """Language consistency: share of texts detected as their intended language (UNKNOWN counted apart)."""
    if len(texts) != len(intended):
        raise ValueError(f"{len(texts)} texts but {len(intended)} intended languages")
    if not texts:
        raise ValueError("no texts to judge")
    predictions = detect_many(texts)
    hits = sum(p == want for p, want in zip(predictions, intended))
    unknown = sum(p == UNKNOWN for p in predictions)
    return {"n": len(texts), "consistent": hits / len(texts), "unknown": unknown / len(texts)}
