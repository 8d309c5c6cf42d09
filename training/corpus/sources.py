"""The one small interface every text source implements, and the two generic sources.

A source has a `name` and `iter_paragraphs()` yielding `Paragraph`s. Aligned sources fill
`parallel_id` with a key shared by translations of the same paragraph; others leave it `None`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Paragraph:
    text: str
    lang: str
    source: str
    parallel_id: str | None = None


class TextSource(Protocol):
    name: str

    def iter_paragraphs(self) -> Iterator[Paragraph]: ...


_BLANK_LINES = re.compile(r"\n\s*\n")


class PlainTextSource:
    """Plain UTF-8 text files, one language per file: `{lang: path}`; paragraphs split on blank lines.

    If `aligned=True`, the i-th paragraph of every file is a translation of the i-th of the others
    (parallel_id = `<name>:<i>`).
    """

    def __init__(self, files: dict[str, str | Path], name: str = "plain-text", aligned: bool = False):
        if not files:
            raise ValueError("PlainTextSource needs at least one {lang: path} entry")
        self.files = {lang: Path(path) for lang, path in files.items()}
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"text files not found: {missing}")
        self.name = name
        self.aligned = aligned

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        for lang, path in self.files.items():
            chunks = [c.strip() for c in _BLANK_LINES.split(path.read_text(encoding="utf-8"))]
            for index, chunk in enumerate(c for c in chunks if c):
                text = " ".join(chunk.split())
                parallel_id = f"{self.name}:{index}" if self.aligned else None
                yield Paragraph(text=text, lang=lang, source=self.name, parallel_id=parallel_id)


class HFDatasetSource:
    """Any dataset `datasets.load_dataset` can open: a hub name (for users online) or a local path.

    Either every row is in `lang`, or `lang_column` names the column holding each row's language.
    `parallel_id_column` optionally names a column aligning translations.
    """

    def __init__(
        self,
        path: str,
        text_column: str = "text",
        lang: str | None = None,
        lang_column: str | None = None,
        config_name: str | None = None,
        split: str = "train",
        parallel_id_column: str | None = None,
        data_files: str | list[str] | dict | None = None,
        max_rows: int | None = None,
    ):
        if (lang is None) == (lang_column is None):
            raise ValueError("give exactly one of `lang` (every row's language) or `lang_column`")
        self.path, self.config_name, self.split = path, config_name, split
        self.text_column, self.lang, self.lang_column = text_column, lang, lang_column
        self.parallel_id_column, self.data_files, self.max_rows = parallel_id_column, data_files, max_rows
        self.name = f"hf:{path}" + (f"/{config_name}" if config_name else "")

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        import datasets  # imported here: the corpus code runs without touching the hub otherwise

        dataset = datasets.load_dataset(
            self.path, self.config_name, split=self.split, data_files=self.data_files
        )
        for column in [self.text_column, self.lang_column, self.parallel_id_column]:
            if column is not None and column not in dataset.column_names:
                raise KeyError(f"column {column!r} not in {self.name}; columns are {dataset.column_names}")
        for index, row in enumerate(dataset):
            if self.max_rows is not None and index >= self.max_rows:
                break
            text = " ".join(str(row[self.text_column]).split())
            if not text:
                continue
            lang = row[self.lang_column] if self.lang_column else self.lang
            parallel_id = None
            if self.parallel_id_column is not None:
                parallel_id = f"{self.name}:{row[self.parallel_id_column]}"
            yield Paragraph(text=text, lang=lang, source=self.name, parallel_id=parallel_id)
