"""Sentence-aligned natural text from games' gettext translation catalogs (`.mo` files).

Each catalog maps an English source string (msgid) to its translation, so the msgid aligns every
language (`parallel_id` = hash of game, domain, context and msgid) and *is* the English text. The games
are item and monster descriptions, dialogue, lore and help (docs/corpus.md has the per-game figures):

| game | Debian package(s) | suite | licence |
|---|---|---|---|
| Cataclysm: Dark Days Ahead | cataclysm-dda-data | sid (0.I; bookworm's 0.F has half) | CC-BY-SA-3.0 |
| Battle for Wesnoth | wesnoth-1.16-data + campaigns | bookworm | GPL-2+ |
| Freeciv | freeciv-data | bookworm | GPL-2+ |
| Widelands | widelands-data | bookworm | GPL-2+ |
| FreedroidRPG | freedroidrpg-data | bookworm | GPL-2+ |
| Warzone 2100 | warzone2100-data | bookworm | GPL-2+ |
| Minetest | minetest-data | bookworm | LGPL-2.1+ / CC-BY-SA-3.0 |

Cleaning: plural entries skipped (their forms are fragments); markup `<…>`, entities `&…;`, macros and
placeholders `{…}`, `$var`, `%s`/`%1$d`, `@` removed; strings still holding `=` (game config syntax)
dropped; untranslated entries (msgstr == msgid) dropped. Length and language filters are the corpus's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.corpus.debian import fetch_package
from training.corpus.sources import Paragraph


@dataclass(frozen=True)
class Game:
    name: str
    packages: tuple[str, ...]
    licence: str
    suite: str = "bookworm"


_WESNOTH_CAMPAIGNS = (
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
GAMES = {
    game.name: game
    for game in (
        Game("cataclysm-dda", ("cataclysm-dda-data",), "CC-BY-SA-3.0", suite="sid"),
        Game("wesnoth", ("wesnoth-1.16-data", *(f"wesnoth-1.16-{c}" for c in _WESNOTH_CAMPAIGNS)), "GPL-2+"),
        Game("freeciv", ("freeciv-data",), "GPL-2+"),
        Game("widelands", ("widelands-data",), "GPL-2+"),
        Game("freedroidrpg", ("freedroidrpg-data",), "GPL-2+"),
        Game("warzone2100", ("warzone2100-data",), "GPL-2+"),
        Game("minetest", ("minetest-data",), "LGPL-2.1+ (code), CC-BY-SA-3.0 (media)"),
    )
}

# Project language → locale folders that hold it, in order of preference (all are read; duplicates go).
LOCALES = {
    "zh": ("zh_CN", "zh_Hans", "zh"),
    "zh-tw": ("zh_TW", "zh_Hant"),
    "pt-br": ("pt_BR",),
    "es": ("es", "es_ES", "es_AR", "es_MX"),
}

# printf placeholders first: `%1$s` must not leave `%1` behind once `$s` is taken for a variable.
_MARKUP = [
    re.compile(p)
    for p in (r"%(\d+\$)?[-+ #0]*\d*[sdif]", r"<[^>]*>", r"&[#\w]+;", r"\{[^}]*\}", r"\$[\w|.]+", r"@")
]
_WHITESPACE = re.compile(r"\s+")


def locale_folders(lang: str) -> tuple[str, ...]:
    """Locale folder names for a project language code (`fr` → fr, fr_FR; `zh` → zh_CN, ...)."""
    lang = lang.lower()
    if lang in LOCALES:
        return LOCALES[lang]
    return (lang, f"{lang}_{lang.upper()}")


def clean_string(text: str) -> str | None:
    for pattern in _MARKUP:
        text = pattern.sub(" ", text)
    text = _WHITESPACE.sub(" ", text.replace("\u00a0", " ")).strip()
    if not text or "=" in text:
        return None
    return text


def _parallel_id(game: str, domain: str, context: str | None, msgid: str) -> str:
    digest = hashlib.sha1(f"{domain}\x00{context or ''}\x00{msgid}".encode()).hexdigest()[:16]
    return f"{game}:{digest}"


def iter_catalogs(roots: list[Path], langs: list[str], game: str) -> Iterator[Paragraph]:
    """Paragraphs from extracted package trees holding `**/locale/<locale>/LC_MESSAGES/*.mo`."""
    import polib

    english_seen: set[str] = set()
    for lang in langs:
        if lang == "en":
            continue
        seen: set[str] = set()
        for root in roots:
            for locale in locale_folders(lang):
                for mo_path in sorted(root.glob(f"**/locale/{locale}/LC_MESSAGES/*.mo")):
                    for entry in polib.mofile(str(mo_path)):
                        if entry.msgid_plural or not entry.msgstr or entry.msgstr == entry.msgid:
                            continue
                        source, translation = clean_string(entry.msgid), clean_string(entry.msgstr)
                        if source is None or translation is None or translation in seen:
                            continue
                        seen.add(translation)
                        pid = _parallel_id(game, mo_path.stem, entry.msgctxt, entry.msgid)
                        yield Paragraph(text=translation, lang=lang, source=game, parallel_id=pid)
                        if "en" in langs and pid not in english_seen:
                            english_seen.add(pid)
                            yield Paragraph(text=source, lang="en", source=game, parallel_id=pid)


class CatalogSource:
    """One game's catalogs for `langs`, fetched from Debian (only the `*.mo` members are extracted)."""

    def __init__(self, game: str, langs: list[str], cache_dir: Path):
        if game not in GAMES:
            from training.errors import UserError

            raise UserError(f"unknown game catalog {game!r}; known: {sorted(GAMES)}")
        self.game = GAMES[game]
        self.name, self.licence = game, self.game.licence
        self.langs, self.cache_dir = list(langs), Path(cache_dir)

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        roots = [
            fetch_package(p, self.cache_dir, patterns=["*.mo"], suite=self.game.suite)
            for p in self.game.packages
        ]
        yield from iter_catalogs(roots, self.langs, self.name)
