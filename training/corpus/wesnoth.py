"""Sentence-aligned natural text (dialogue, story, lore) from Battle for Wesnoth's translation catalogs.

Each `.mo` catalog maps an English source string (msgid) to its translation, so the msgid aligns every
language (`parallel_id` = hash of domain, context and msgid) and *is* the English text. GPL-2+.
Cleaning (docs/corpus.md): plural entries skipped; markup `<…>`, entities `&…;`, macros `{…}`,
variables `$var` and `@` removed; strings still holding `=` (WML) dropped; untranslated entries dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from training.corpus.debian import fetch_package
from training.corpus.sources import Paragraph

SOURCE_NAME = "wesnoth"
DEFAULT_PACKAGES = ["wesnoth-1.16-data"] + [
    f"wesnoth-1.16-{c}"
    for c in (
        "httt",
        "trow",
        "ei",
        "did",
        "l",
        "low",
        "nr",
        "sof",
        "sota",
        "sotbe",
        "thot",
        "tsg",
        "ttb",
        "utbs",
        "dm",
        "dw",
    )
]
_LOCALE_SUBDIR = "usr/share/games/wesnoth/1.16/locale"
_MARKUP = [re.compile(p) for p in (r"<[^>]*>", r"&[#\w]+;", r"\{[^}]*\}", r"\$[\w|.]+", r"@")]
_WHITESPACE = re.compile(r"\s+")


def locale_name(lang: str) -> str:
    """Wesnoth's locale folder for a project language code (`zh` → `zh_CN`, `pt-br` → `pt_BR`)."""
    special = {"zh": "zh_CN", "zh-tw": "zh_TW", "pt-br": "pt_BR"}
    if lang.lower() in special:
        return special[lang.lower()]
    return lang.replace("-", "_")


def clean_string(text: str) -> str | None:
    for pattern in _MARKUP:
        text = pattern.sub(" ", text)
    text = _WHITESPACE.sub(" ", text.replace("\u00a0", " ")).strip()
    if not text or "=" in text:
        return None
    return text


def _parallel_id(domain: str, context: str | None, msgid: str) -> str:
    digest = hashlib.sha1(f"{domain}\x00{context or ''}\x00{msgid}".encode()).hexdigest()[:16]
    return f"{SOURCE_NAME}:{digest}"


def iter_catalog_roots(roots: list[Path], langs: list[str]) -> Iterator[Paragraph]:
    """Paragraphs from extracted trees holding
    `usr/share/games/wesnoth/1.16/locale/<locale>/LC_MESSAGES/*.mo`."""
    import polib

    english_seen: set[str] = set()
    for root in roots:
        locale_root = root / _LOCALE_SUBDIR
        for lang in langs:
            if lang == "en":
                continue
            for mo_path in sorted((locale_root / locale_name(lang) / "LC_MESSAGES").glob("*.mo")):
                domain = mo_path.stem
                for entry in polib.mofile(str(mo_path)):
                    if entry.msgid_plural or not entry.msgstr or entry.msgstr == entry.msgid:
                        continue
                    source, translation = clean_string(entry.msgid), clean_string(entry.msgstr)
                    if source is None or translation is None:
                        continue
                    pid = _parallel_id(domain, entry.msgctxt, entry.msgid)
                    yield Paragraph(text=translation, lang=lang, source=SOURCE_NAME, parallel_id=pid)
                    if "en" in langs and pid not in english_seen:
                        english_seen.add(pid)
                        yield Paragraph(text=source, lang="en", source=SOURCE_NAME, parallel_id=pid)


class WesnothSource:
    """Wesnoth catalogs for `langs`, fetched from Debian (only the `*.mo` members are extracted)."""

    name = SOURCE_NAME

    def __init__(self, langs: list[str], cache_dir: Path, packages: list[str] | None = None):
        self.langs = list(langs)
        self.cache_dir = Path(cache_dir)
        self.packages = packages or DEFAULT_PACKAGES

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        roots = [fetch_package(p, self.cache_dir, patterns=["*.mo"]) for p in self.packages]
        yield from iter_catalog_roots(roots, self.langs)
