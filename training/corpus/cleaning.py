"""Cleaning across sources: near-duplicates and leaks into the held-out parallel split.

- Near-duplicates: two paragraphs of one language whose text is the same after Unicode normalisation
  (NFKC), case folding and removal of digits, punctuation and whitespace. A paragraph of a later source
  that near-duplicates one of an earlier source is dropped (sources are read in a fixed order, LibreOffice
  first), so the same sentence shipped by two projects is counted once.
- Leaks: a paragraph of another source than the held-out split's that shares a word 8-gram (a character
  16-gram for zh/ja, which have no spaces) with any held-out parallel paragraph of its language is dropped,
  so no training text repeats evaluation text. Overlap inside the held-out split's own source is left as
  it is (the split is chosen per paragraph from it) and reported.
- Script: a paragraph must be written mostly in its language's script (share of its letters ≥
  `min_share`): translated documentation often leaves English passages in a Russian or Greek page, and
  Chinese and Japanese share the Han characters, so Japanese needs kana and Chinese has (almost) none.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator

from training.corpus.sources import Paragraph

_NOT_LETTERS = re.compile(r"[\W\d_]+", re.UNICODE)
WORD_NGRAM = 8
CHAR_NGRAM = 16
UNSPACED = ("zh", "ja")

_SCRIPT_LETTERS = {
    "latin": re.compile(r"[A-Za-z\u00C0-\u024F]"),
    "cyrillic": re.compile(r"[\u0400-\u052F]"),
    "greek": re.compile(r"[\u0370-\u03FF\u1F00-\u1FFF]"),
    "han": re.compile(r"[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]"),
    "kana": re.compile(r"[\u3040-\u30FF]"),
}
CJK_MIN_SHARE = 0.2
_HIRAGANA = re.compile(r"[\u3040-\u309F]")
LANG_SCRIPT = {
    **{lang: "latin" for lang in ("en", "fr", "de", "es", "eu", "it", "pt", "nl", "ca", "gl", "pl", "tr")},
    **{lang: "cyrillic" for lang in ("ru", "uk", "bg", "sr")},
    "el": "greek",
}


def wrong_script(text: str, lang: str, min_share: float = 0.6) -> bool:
    """True if `text` is not mostly written in `lang`'s script (languages without a rule pass)."""
    letters = sum(char.isalpha() for char in text)
    if letters == 0:
        return True

    def share(script: str) -> float:
        return len(_SCRIPT_LETTERS[script].findall(text)) / letters

    # A Han character is a word where a Latin word takes several letters, and Chinese or Japanese technical
    # text is full of English names ("选择 LibreOffice Writer 的菜单"): these two only need a fifth of
    # their letters in their script, Japanese some hiragana, Chinese (almost) no kana.
    if lang == "ja":
        return not _HIRAGANA.search(text) or share("han") + share("kana") < CJK_MIN_SHARE
    if lang == "zh":
        return len(_SCRIPT_LETTERS["kana"].findall(text)) >= 2 or share("han") < CJK_MIN_SHARE
    script = LANG_SCRIPT.get(lang)
    return script is not None and share(script) < min_share


def near_duplicate_key(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return hashlib.sha1(_NOT_LETTERS.sub("", folded).encode()).hexdigest()


def drop_cross_source_near_duplicates(paragraphs: list[Paragraph]) -> tuple[list[Paragraph], int]:
    """Keep a paragraph unless an earlier *source* already gave one with the same near-duplicate key."""
    first_source: dict[tuple[str, str], str] = {}
    kept = []
    for p in paragraphs:
        key = (p.lang, near_duplicate_key(p.text))
        owner = first_source.setdefault(key, p.source)
        if owner == p.source:
            kept.append(p)
    return kept, len(paragraphs) - len(kept)


def ngrams(text: str, lang: str) -> Iterator[str]:
    """Word 8-grams (character 16-grams for unspaced scripts) of the normalised text."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    if lang in UNSPACED:
        letters = _NOT_LETTERS.sub("", folded)
        for i in range(len(letters) - CHAR_NGRAM + 1):
            yield letters[i : i + CHAR_NGRAM]
    else:
        words = [w for w in _NOT_LETTERS.split(folded) if w]
        for i in range(len(words) - WORD_NGRAM + 1):
            yield " ".join(words[i : i + WORD_NGRAM])


class LeakIndex:
    """The n-grams of the held-out parallel paragraphs, per language."""

    def __init__(self, held_out: Iterable[tuple[str, str]]):
        self.grams: dict[str, set[str]] = {}
        for lang, text in held_out:
            self.grams.setdefault(lang, set()).update(ngrams(text, lang))

    def leaks(self, text: str, lang: str) -> bool:
        grams = self.grams.get(lang, set())
        return any(gram in grams for gram in ngrams(text, lang))
