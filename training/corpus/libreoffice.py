"""Paragraph-parallel text from the LibreOffice help packages (`libreoffice-help-<lang>`, MPL-2.0).

Every help page exists in every language, and paragraphs carry stable ids (`par_id…`, `hd_id…`), so
`(page path, paragraph id)` aligns translations. Cleaning (docs/corpus.md):
- only `p`/`h1`-`h6` elements with such an id inside the page's display area;
- platform variants inside `switchinline` are hidden spans: keep the `default…` one, drop Mac/Writer/…;
- drop code paragraphs (class `code`, `bascode`, …);
- drop paragraphs identical to the English one (untranslated fallback) — done in `build.py`, which
  sees all languages.

The same parser records the UI terms the help marks inside a paragraph (`<span class="menuitem">`,
`<span class="emph">`) as character spans of the cleaned text (`parse_help_page_marks`) — the
answers of LinguaMap's cloze task (analysis/linguamap.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from training.corpus.debian import fetch_package
from training.corpus.sources import Paragraph

SOURCE_NAME = "libreoffice-help"
_PARAGRAPH_ID = re.compile(r"^(par|hd)_id\d+")
_PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
_CODE_CLASSES = {"code", "codeintable", "bascode", "smathcode", "pycode", "example"}
_VOID_TAGS = {"br", "img", "input", "meta", "link", "hr", "wbr", "source", "area", "base", "col", "embed"}
_SKIP_CONTENT_TAGS = {"script", "style", "noscript"}
_WHITESPACE = re.compile(r"\s+")
MARK_CLASSES = ("menuitem", "emph")
# Private-use characters stand for "a marked span starts / ends here" while the text is collected.
_MARK_START, _MARK_END = "\ue000", "\ue001"


def package_name(lang: str) -> str:
    """Debian package for a project language code (`en` → `libreoffice-help-en-us`)."""
    special = {"en": "en-us", "zh": "zh-cn", "zh-tw": "zh-tw", "pt": "pt"}
    return "libreoffice-help-" + special.get(lang.lower(), lang.lower())


def help_dir_name(lang: str) -> str:
    """Directory under usr/share/libreoffice/help for a language (`zh` → `zh-CN`, `pt-br` → `pt-BR`)."""
    special = {"en": "en-US", "zh": "zh-CN"}
    if lang.lower() in special:
        return special[lang.lower()]
    if "-" in lang:
        base, region = lang.split("-", 1)
        return f"{base.lower()}-{region.upper()}"
    return lang.lower()


class _HelpPageParser(HTMLParser):
    """Collects `(paragraph id, text)` from one help page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self.marks: dict[str, list[tuple[int, int, str]]] = {}  # paragraph id → (start, end, class)
        self._mark_stack: list[tuple[int, str]] = []  # (depth, class) of the open marked spans
        self._stack: list[str] = []
        self._in_display_depth: int | None = None  # stack depth of the DisplayArea div
        self._paragraph: tuple[str, int, bool] | None = None  # (id, depth, is_code)
        self._hidden_depth: int | None = None  # depth of a hidden variant we are skipping
        self._skip_depth: int | None = None  # inside <script>/<style>
        self._chunks: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            return
        attributes = {k: (v or "") for k, v in attrs}
        self._stack.append(tag)
        depth = len(self._stack)
        if tag in _SKIP_CONTENT_TAGS and self._skip_depth is None:
            self._skip_depth = depth
        if attributes.get("id") == "DisplayArea":
            self._in_display_depth = depth
        if self._paragraph is None:
            element_id = attributes.get("id", "")
            if (
                self._in_display_depth is not None
                and tag in _PARAGRAPH_TAGS
                and _PARAGRAPH_ID.match(element_id)
            ):
                classes = set(attributes.get("class", "").split())
                self._paragraph = (element_id, depth, bool(classes & _CODE_CLASSES))
                self._chunks = []
        elif self._hidden_depth is None and "hidden" in attributes:
            # A platform/application variant. Keep the default one so each paragraph reads once.
            if not attributes.get("id", "").startswith("default"):
                self._hidden_depth = depth
        elif tag == "span" and self._hidden_depth is None and not self._mark_stack:
            marked = set(attributes.get("class", "").split()) & set(MARK_CLASSES)
            if marked:
                self._mark_stack.append((depth, sorted(marked)[0]))
                self._chunks.append(_MARK_START)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or tag not in self._stack:
            return  # stray end tag: ignore rather than unbalance the stack
        while self._stack:
            depth = len(self._stack)
            popped = self._stack.pop()
            self._close(depth)
            if popped == tag:
                break

    def _close(self, depth: int) -> None:
        if self._mark_stack and self._mark_stack[-1][0] == depth:
            self._chunks.append(_MARK_END + self._mark_stack.pop()[1] + _MARK_END)
        if self._hidden_depth == depth:
            self._hidden_depth = None
        if self._skip_depth == depth:
            self._skip_depth = None
        if self._paragraph is not None and self._paragraph[1] == depth:
            element_id, _, is_code = self._paragraph
            text, marks = _text_and_marks("".join(self._chunks))
            if text and not is_code:
                self.paragraphs.append((element_id, text))
                self.marks.setdefault(element_id, marks)
            self._paragraph = None
            self._mark_stack.clear()
        if self._in_display_depth == depth:
            self._in_display_depth = None

    def handle_data(self, data: str) -> None:
        if self._paragraph is not None and self._hidden_depth is None and self._skip_depth is None:
            self._chunks.append(data)


def _text_and_marks(raw: str) -> tuple[str, list[tuple[int, int, str]]]:
    """The cleaned paragraph text (whitespace runs → one space, stripped: exactly what the corpus
    holds) and the marked spans as (start, end, class) offsets into it, trimmed of spaces."""
    plain = re.sub(f"{_MARK_END}[a-z]+{_MARK_END}|{_MARK_START}", "", raw)
    text = _WHITESPACE.sub(" ", plain).strip()
    marks, opened = [], None
    for match in re.finditer(f"{_MARK_START}|{_MARK_END}([a-z]+){_MARK_END}", raw):
        before = re.sub(f"{_MARK_END}[a-z]+{_MARK_END}|{_MARK_START}", "", raw[: match.start()])
        offset = min(len(_WHITESPACE.sub(" ", before).lstrip()), len(text))
        if match.group(0) == _MARK_START:
            opened = offset
        elif opened is not None:
            start, end = opened, offset
            while start < end and text[start] == " ":
                start += 1
            while end > start and text[end - 1] == " ":
                end -= 1
            if end > start:
                marks.append((start, end, match.group(1)))
            opened = None
    return text, marks


def _parse(html: str) -> _HelpPageParser:
    parser = _HelpPageParser()
    parser.feed(html)
    parser.close()
    return parser


def parse_help_page(html: str) -> list[tuple[str, str]]:
    """`(paragraph id, cleaned text)` pairs of one page, first occurrence of each id only."""
    seen: set[str] = set()
    unique = []
    for element_id, text in _parse(html).paragraphs:
        if element_id not in seen:
            seen.add(element_id)
            unique.append((element_id, text))
    return unique


def parse_help_page_marks(html: str) -> dict[str, tuple[str, list[tuple[int, int, str]]]]:
    """Paragraph id → (cleaned text, marked UI-term spans (start, end, class)), first occurrence only."""
    parser = _parse(html)
    out: dict[str, tuple[str, list[tuple[int, int, str]]]] = {}
    for element_id, text in parser.paragraphs:
        if element_id not in out:
            out[element_id] = (text, parser.marks.get(element_id, []))
    return out


def iter_help_tree(help_root: Path, lang: str, subdirs: list[str] | None = None) -> Iterator[Paragraph]:
    """Paragraphs of every page under `help_root/<lang dir>/text[/subdir]`."""
    lang_root = help_root / help_dir_name(lang)
    if not lang_root.is_dir():
        raise FileNotFoundError(f"no LibreOffice help for {lang!r} at {lang_root}")
    roots = [lang_root / "text" / s for s in subdirs] if subdirs else [lang_root / "text"]
    for root in roots:
        for page in sorted(root.rglob("*.html")):
            relative = page.relative_to(lang_root).as_posix()
            for element_id, text in parse_help_page(page.read_text(encoding="utf-8", errors="replace")):
                yield Paragraph(
                    text=text, lang=lang, source=SOURCE_NAME, parallel_id=f"lo:{relative}#{element_id}"
                )


class LibreOfficeHelpSource:
    """Paragraph-parallel LibreOffice help text for `langs`, fetched from Debian into `cache_dir`.

    `subdirs` restricts pages to some folders under `text/` (e.g. `["shared/optionen"]`) for quick
    slices in tests.
    """

    name = SOURCE_NAME

    def __init__(self, langs: list[str], cache_dir: Path, subdirs: list[str] | None = None):
        self.langs = list(langs)
        self.cache_dir = Path(cache_dir)
        self.subdirs = subdirs

    def help_root(self, lang: str) -> Path:
        return fetch_package(package_name(lang), self.cache_dir) / "usr/share/libreoffice/help"

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        for lang in self.langs:
            yield from iter_help_tree(self.help_root(lang), lang, self.subdirs)
