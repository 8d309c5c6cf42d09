"""Prose from Debian's translated manuals (HTML): the Debian Administrator's Handbook, the installation
guide, the Debian reference and the FAQ.

Each manual ships one HTML tree (or file suffix) per language; a file's language is read from its path
(`html/fr-FR/`, `zh_CN/`, `ch01.fr.html`). Paragraphs are the text of block elements (`p`, `li`, `dd`,
`td`, and DocBook's `div class="para"`), with inline markup kept as text; `pre`, `script` and `style`
blocks (commands, program listings) are dropped. Sections of one manual in several languages are not
aligned paragraph by paragraph, so these paragraphs carry no parallel id. The licence recorded is the
first `License:` line of each package's copyright file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from training.corpus.catalogs import locale_folders
from training.corpus.debian import fetch_package
from training.corpus.sources import Paragraph


@dataclass(frozen=True)
class Manual:
    name: str
    packages: tuple[str, ...]  # "{lang}" is filled for per-language packages
    per_language: bool = False


MANUALS = {
    manual.name: manual
    for manual in (
        Manual("debian-handbook", ("debian-handbook",)),
        Manual("installation-guide", ("installation-guide-amd64",)),
        Manual("debian-reference", ("debian-reference-{lang}",), per_language=True),
        Manual("debian-faq", ("debian-faq", "debian-faq-{lang}"), per_language=True),
    )
}
# Debian's package suffixes for languages whose codes differ from ours.
PACKAGE_LANG = {"zh": "zh-cn"}

_BLOCKS = {"p", "li", "dd", "td", "th", "h1", "h2", "h3", "h4", "dt"}
_SKIP = {"pre", "script", "style", "head", "title"}
_WHITESPACE = re.compile(r"\s+")


class _ParagraphParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._text: list[str] = []
        self._skip = 0

    def _flush(self) -> None:
        text = _WHITESPACE.sub(" ", "".join(self._text)).strip()
        if text:
            self.paragraphs.append(text)
        self._text = []

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self._skip += 1
        elif tag in _BLOCKS or (tag == "div" and ("class", "para") in attrs) or tag == "br":
            self._flush()

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCKS or tag == "div":
            self._flush()

    def handle_data(self, data):
        if not self._skip:
            self._text.append(data)


def html_paragraphs(html: str) -> list[str]:
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.paragraphs


def _path_tokens(path: Path) -> set[str]:
    """Lower-cased, `_`→`-` path components and `.xx.html` suffixes: the places a language code sits."""
    tokens = {part.lower().replace("_", "-") for part in path.parts}
    suffixes = path.name.lower().split(".")
    tokens.update(s.replace("_", "-") for s in suffixes[1:-1])
    return tokens


def path_language(path: Path, langs: list[str]) -> str | None:
    """The project language of an HTML file from its path, or None."""
    tokens = _path_tokens(path)
    for lang in langs:
        names = {name.lower().replace("_", "-") for name in locale_folders(lang)}
        names |= {"en-us"} if lang == "en" else set()
        names |= {PACKAGE_LANG.get(lang, lang)}
        if tokens & names:
            return lang
    return None


def package_licence(root: Path, package: str) -> str:
    copyright_file = root / "usr/share/doc" / package / "copyright"
    if copyright_file.is_file():
        for line in copyright_file.read_text(errors="replace").splitlines():
            if line.startswith("License:"):
                return line.removeprefix("License:").strip()
    return "see the package's copyright file"


def iter_manual_tree(root: Path, langs: list[str], source: str) -> Iterator[Paragraph]:
    for path in sorted(root.rglob("*.htm*")):
        lang = path_language(path.relative_to(root), langs)
        if lang is None:
            continue
        for text in html_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            yield Paragraph(text=text, lang=lang, source=source)


class ManualSource:
    """One manual for `langs`, fetched from Debian (only its HTML and copyright members are extracted)."""

    def __init__(self, manual: str, langs: list[str], cache_dir: Path):
        if manual not in MANUALS:
            from training.errors import UserError

            raise UserError(f"unknown manual {manual!r}; known: {sorted(MANUALS)}")
        self.manual, self.name = MANUALS[manual], manual
        self.langs, self.cache_dir = list(langs), Path(cache_dir)
        self.licence = "unknown until fetched"

    def packages(self) -> list[str]:
        names = []
        for template in self.manual.packages:
            if "{lang}" in template:
                names += [
                    template.format(lang=PACKAGE_LANG.get(lang, lang)) for lang in self.langs if lang != "en"
                ]
                if template.format(lang="en") not in names and self.manual.name == "debian-reference":
                    names.append(template.format(lang="en"))
            else:
                names.append(template)
        return names

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        from training.corpus.debian import DebianFetchError

        licences = set()
        for package in self.packages():
            try:
                root = fetch_package(package, self.cache_dir, patterns=["*.htm*", "*/copyright"])
            except DebianFetchError as error:  # e.g. no debian-faq-ru: that language has no translation
                print(f"warning: {self.name}: {package} skipped ({str(error).splitlines()[0]})")
                continue
            licences.add(package_licence(root, package))
            yield from iter_manual_tree(root, self.langs, self.name)
        self.licence = " / ".join(sorted(licences))
