"""Debian's translated package descriptions (the Debian Description Translation Project, DDTP).

apt fetches `Translation-xx` lists next to the package lists; each stanza holds a package's
`Description-md5` and its description in one language: a synopsis line, then the long description,
whose paragraphs are separated by ` .` lines. The md5 identifies the English original, so the k-th
paragraph of a description aligns across languages (`parallel_id` = `ddtp:<md5>:<k>`). Technical and
repetitive prose (many packages share paragraphs; exact duplicates are removed by the corpus build).
The text of each description is under the licence of its package; the translations are contributed to
Debian under the DDTP's terms (free to redistribute with Debian).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

from training.corpus.cleaning import UNSPACED
from training.corpus.debian import DebianFetchError, suite_apt_options
from training.corpus.sources import Paragraph

SOURCE_NAME = "ddtp"
APT_CODES = {"zh": "zh_CN", "zh-tw": "zh_TW", "pt-br": "pt_BR"}


def parse_translation_list(text: str, lang: str) -> Iterator[Paragraph]:
    """Paragraphs of the long descriptions in a `Translation-xx` list (deb822 stanzas)."""
    field = f"Description-{APT_CODES.get(lang, lang)}:"
    joiner = "" if lang in UNSPACED else " "  # CJK lines are wrapped without spaces
    for stanza in text.split("\n\n"):
        md5, lines, in_description = None, [], False
        for line in stanza.splitlines():
            if line.startswith("Description-md5:"):
                md5 = line.split(":", 1)[1].strip()
            elif line.startswith(field):
                in_description = True  # the synopsis follows on this line: a title, not prose
            elif in_description and line.startswith(" "):
                lines.append(line[1:])
            else:
                in_description = False
        if md5 is None:
            continue
        paragraphs, current = [], []
        for line in lines + ["."]:
            if line.strip() == ".":
                if current:
                    paragraphs.append(joiner.join(part.strip() for part in current))
                current = []
            else:
                current.append(line)
        for k, paragraph in enumerate(paragraphs):
            yield Paragraph(
                text=paragraph, lang=lang, source=SOURCE_NAME, parallel_id=f"{SOURCE_NAME}:{md5}:{k}"
            )


class DDTPSource:
    """The translated descriptions of the system's Debian suite for `langs` (English included)."""

    name = SOURCE_NAME
    licence = "each package's own licence (descriptions); DDTP translations distributed with Debian"

    def __init__(self, langs: list[str], cache_dir: Path, suite: str = "bookworm"):
        self.langs, self.cache_dir, self.suite = list(langs), Path(cache_dir), suite

    def iter_paragraphs(self) -> Iterator[Paragraph]:
        codes = sorted({APT_CODES.get(lang, lang) for lang in self.langs} | {"en"})
        options = suite_apt_options(self.suite, self.cache_dir, languages=codes)
        lists = Path(next(o.split("=", 1)[1] for o in options if o.startswith("Dir::State::Lists=")))
        for lang in self.langs:
            code = APT_CODES.get(lang, lang).replace("_", "%5f")
            files = sorted(lists.glob(f"*_i18n_Translation-{code}*"))
            if not files:
                print(
                    f"warning: ddtp: no Translation-{APT_CODES.get(lang, lang)} list in Debian {self.suite}; "
                    "skipped"
                )
                continue
            result = subprocess.run(
                ["/usr/lib/apt/apt-helper", "cat-file", str(files[0])], capture_output=True
            )
            if result.returncode != 0:
                raise DebianFetchError(
                    f"cannot read {files[0]}: {result.stderr.decode(errors='replace')[-300:]}"
                )
            yield from parse_translation_list(result.stdout.decode("utf-8", errors="replace"), lang)
