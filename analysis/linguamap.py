"""LinguaMap's four-scenario protocol, offline (seeds 000/001; docs/methods.md §10; issue #14).

The task is a **UI-term cloze** on the parallel LibreOffice help: the help marks UI terms
(`<span class="menuitem">Format - Cellules</span>`, `<span class="emph">Hauteur de ligne</span>`), and
paragraphs are parallel by id, so each marked term has its translation in every language. An item is
a paragraph prefix that ends just before a marked term; the answer is the term. The k-th marked span of
a paragraph is aligned across languages only when every language marks the same number of spans (of
the same classes, in the same order) — otherwise the paragraph is dropped.

Held-out items come only from the corpus's held-out parallel split (never trained on); fine-tuning
items only from pages that hold no held-out paragraph.

Scenarios (demonstration language × query language → expected answer language), for each language L:
    (1) en demos + en query → en     (2) L demos + L query → L
    (3) en demos + L query → L       (4) L demos + en query → L
A prompt is k demonstrations (prefix + term, one per line, from other pages) then the query prefix.

Scoring, by generation: the greedy continuation is **correct** (starts with the expected term), **other
language** (starts with the term of another language: the consistency bottleneck), **wrong, expected
language** (CLD2 says the expected language: the transfer bottleneck) or **other**. By likelihood: the
expected term is ranked against its translation in a contrast language (the query's language, else
English, else French) and ≥ 3 other marked terms of the same page in the expected language, by mean
log-probability per token (so longer terms are not penalised for their length); the top candidate
gives the same four outcomes (a distractor on top = transfer bottleneck).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training import langid

OUTCOMES = ("correct", "other_language", "wrong_expected_language", "other")
SCENARIOS = ("1", "2", "3", "4")
MIN_PREFIX_CHARS = 12


@dataclass
class ClozeItem:
    """One marked term of one paragraph, in every language."""

    item_id: str  # parallel id + "@" + index of the mark
    page: str  # the help page (relative path) it comes from
    prefix: dict[str, str]  # language → paragraph text before the term
    term: dict[str, str]  # language → the term
    distractors: dict[str, list[str]] = field(default_factory=dict)  # other marked terms of the page

    def to_json(self) -> dict:
        return self.__dict__

    @staticmethod
    def from_json(doc: dict) -> ClozeItem:
        return ClozeItem(**doc)


def align_marks(
    paragraphs: dict[str, tuple[str, list[tuple[int, int, str]]]], parallel_id: str, page: str
) -> list[ClozeItem]:
    """Items of one paragraph given per language (text, marks), or [] when the languages' marks do not
    correspond (different counts or classes) — such paragraphs are dropped, never guessed."""
    langs = list(paragraphs)
    marks = {lang: paragraphs[lang][1] for lang in langs}
    classes = {lang: [c for _, _, c in marks[lang]] for lang in langs}
    if len({tuple(c) for c in classes.values()}) != 1 or not marks[langs[0]]:
        return []
    terms = {lang: [paragraphs[lang][0][a:b].strip().casefold() for a, b, _ in marks[lang]] for lang in langs}
    for lang in langs[1:]:  # a language whose k-th term is another position's term: the marks are permuted
        if any(
            t == other and j != k
            for k, t in enumerate(terms[lang])
            for j, other in enumerate(terms[langs[0]])
        ):
            return []
    items = []
    for k in range(len(marks[langs[0]])):
        prefix, term = {}, {}
        for lang in langs:
            text = paragraphs[lang][0]
            start, end, _ = marks[lang][k]
            prefix[lang], term[lang] = text[:start], text[start:end]
        if all(len(p.strip()) >= MIN_PREFIX_CHARS for p in prefix.values()):
            items.append(ClozeItem(f"{parallel_id}@{k}", page, prefix, term))
    return items


def with_distractors(items: list[ClozeItem], page_terms: dict[str, dict[str, list[str]]]) -> list[ClozeItem]:
    """Adds each item's distractors: the other distinct marked terms of its page, per language."""
    for item in items:
        item.distractors = {
            lang: sorted({t for t in page_terms.get(item.page, {}).get(lang, []) if t != item.term[lang]})
            for lang in item.term
        }
    return items


def tells_apart(item: ClozeItem, lang: str, reference: str = "en") -> bool:
    """Whether the item's term differs between `lang` and `reference` (an untranslated term — "OK",
    "Page", a formula command — cannot show which language the model answers in)."""
    return lang == reference or item.term[lang].strip().casefold() != item.term[reference].strip().casefold()


def scenario_languages(scenario: str, lang: str) -> tuple[str, str, str]:
    """(demonstration language, query language, expected answer language)."""
    return {
        "1": ("en", "en", "en"),
        "2": (lang, lang, lang),
        "3": ("en", lang, lang),
        "4": (lang, "en", lang),
    }[scenario]


def truncate_prefix(prefix: str, max_chars: int) -> str:
    """The last `max_chars` characters of a prefix, starting at a word if there is a space to cut at
    (the cloze needs the words just before the term; a 128-token model cannot take whole paragraphs)."""
    if len(prefix) <= max_chars:
        return prefix
    cut = prefix[-max_chars:]
    space = cut.find(" ", 0, max_chars // 2)
    return cut[space + 1 :] if space >= 0 else cut


def build_prompt(demos: list[tuple[str, str]], query_prefix: str) -> str:
    """k demonstrations (prefix immediately followed by its term), one per line, then the query prefix
    without its trailing space (the answer's first token carries the space, as BPE sees it mid-text)."""
    lines = [prefix + term for prefix, term in demos]
    return "\n".join(lines + [query_prefix.rstrip()])


def answer_text(prefix: str, term: str) -> str:
    """The term as it continues the prompt: with the space the prefix ended with, if any."""
    return (" " if prefix[-1:].isspace() else "") + term


def choose_demos(items: list[ClozeItem], query: ClozeItem, k: int, rng: random.Random) -> list[ClozeItem]:
    """k items of other pages than the query's."""
    pool = [item for item in items if item.page != query.page]
    return rng.sample(pool, min(k, len(pool)))


def classify(continuation: str, item: ClozeItem, expected_lang: str) -> str:
    """One of OUTCOMES for a generated continuation (see the module docstring)."""
    text = continuation.strip().casefold()
    if text.startswith(item.term[expected_lang].strip().casefold()):
        return "correct"
    expected = item.term[expected_lang].strip().casefold()
    for lang, term in item.term.items():
        other = term.strip().casefold()
        if lang != expected_lang and other != expected and other and text.startswith(other):
            return "other_language"
    if langid.detect(continuation) == expected_lang:
        return "wrong_expected_language"
    return "other"


def contrast_language(expected_lang: str, query_lang: str) -> str:
    if query_lang != expected_lang:
        return query_lang
    return "en" if expected_lang != "en" else "fr"


@torch.no_grad()
def candidate_scores(model, tokenizer, prompt: str, candidates: list[str]) -> list[float]:
    """Mean log-probability per token of each candidate continuation of `prompt` (BOS + prompt).

    All candidates go through one forward pass, right-padded: in a causal model padding after a
    sequence cannot change the logits before it, so each score is what a pass of its own gives."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    usable = [i for i, ids in enumerate(encoded) if ids]
    scores = [float("-inf")] * len(candidates)
    if not usable:
        return scores
    limit = model.config.n_positions
    rows = [(prompt_ids + encoded[i])[-limit:] for i in usable]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    logprobs = F.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), -1)
    for row, i in enumerate(usable):
        ids, end = encoded[i], len(rows[row])
        positions = torch.arange(end - len(ids) - 1, end - 1, device=device)
        targets = torch.tensor(ids, device=device)
        scores[i] = float(logprobs[row, positions, targets].mean())
    return scores


def likelihood_outcome(scores: list[float]) -> str:
    """Candidates are ordered [expected, contrast-language translation, distractors...]."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    return "correct" if best == 0 else "other_language" if best == 1 else "wrong_expected_language"


def other_verdicts(continuations: list[str], outcomes: list[str]) -> dict[str, float]:
    """What the judge calls the answers classified "other" (neither a term nor the expected language),
    as shares of all answers, most common first: it tells a weak model's drift into another language
    (e.g. English text that is not the English term) from text no language can be read in ('unknown')."""
    verdicts = Counter(langid.detect(c) for c, o in zip(continuations, outcomes, strict=True) if o == "other")
    return {lang: k / max(1, len(outcomes)) for lang, k in verdicts.most_common()}


def shares(outcomes: list[str]) -> dict[str, float]:
    n = max(1, len(outcomes))
    return {o: sum(x == o for x in outcomes) / n for o in OUTCOMES} | {"n": len(outcomes)}


# --- items from the corpus ------------------------------------------------------------------------------


def page_and_paragraph(parallel_id: str) -> tuple[str, str] | None:
    """'lo:text/scalc/01/x.html#par_id1' → ('text/scalc/01/x.html', 'par_id1'); None for other sources."""
    if not parallel_id or not parallel_id.startswith("lo:") or "#" not in parallel_id:
        return None
    page, paragraph = parallel_id[3:].split("#", 1)
    return page, paragraph


def held_out_items(corpus, langs: list[str], help_roots: dict[str, Path]) -> tuple[list[ClozeItem], dict]:
    """Aligned items of the held-out parallel split's LibreOffice paragraphs, with counts."""
    from training.corpus.libreoffice import help_dir_name, parse_help_page_marks

    split = corpus["parallel"]
    texts: dict[str, dict[str, str]] = {}
    for text, lang, parallel_id in zip(split["text"], split["lang"], split["parallel_id"]):
        if lang in langs and page_and_paragraph(parallel_id):
            texts.setdefault(parallel_id, {})[lang] = text
    pages = sorted({page_and_paragraph(pid)[0] for pid in texts})
    parsed: dict[str, dict[str, dict]] = {}  # page → lang → paragraph id → (text, marks)
    page_terms: dict[str, dict[str, list[str]]] = {}
    for page in pages:
        for lang in langs:
            path = help_roots[lang] / help_dir_name(lang) / page
            marks = (
                parse_help_page_marks(path.read_text(encoding="utf-8", errors="replace"))
                if path.exists()
                else {}
            )
            parsed.setdefault(page, {})[lang] = marks
            page_terms.setdefault(page, {})[lang] = [
                t[a:b] for t, spans in marks.values() for a, b, _ in spans
            ]
    counts = {"paragraphs": len(texts), "with_marks": 0, "misaligned": 0, "text_mismatch": 0}
    items = []
    for parallel_id, by_lang in sorted(texts.items()):
        page, paragraph = page_and_paragraph(parallel_id)
        if set(by_lang) != set(langs):
            continue
        found = {lang: parsed[page][lang].get(paragraph) for lang in langs}
        if any(f is None or f[0] != by_lang[lang] for lang, f in found.items()):
            counts["text_mismatch"] += 1  # the page no longer gives the corpus's text: not aligned
            continue
        if not any(f[1] for f in found.values()):
            continue
        counts["with_marks"] += 1
        aligned = align_marks({lang: found[lang] for lang in langs}, parallel_id, page)
        if not aligned:
            counts["misaligned"] += 1
        items += aligned
    counts["items"] = len(items)
    return with_distractors(items, page_terms), counts


# --- fine-tuning data: the same format, from pages that hold no held-out paragraph -----------------------


def training_items(
    help_roots: dict[str, Path], langs: list[str], exclude_pages: set[str], subdirs: list[str] | None = None
) -> list[ClozeItem]:
    """Aligned items of every help page (under text/, or text/<subdir>) outside `exclude_pages` (the
    pages holding held-out paragraphs)."""
    from training.corpus.libreoffice import help_dir_name, parse_help_page_marks

    reference = help_roots[langs[0]] / help_dir_name(langs[0])
    roots = [reference / "text" / d for d in subdirs] if subdirs else [reference / "text"]
    pages = sorted(p.relative_to(reference).as_posix() for root in roots for p in root.rglob("*.html"))
    items, page_terms = [], {}
    for page in pages:
        if page in exclude_pages:
            continue
        parsed = {}
        for lang in langs:
            path = help_roots[lang] / help_dir_name(lang) / page
            parsed[lang] = (
                parse_help_page_marks(path.read_text(encoding="utf-8", errors="replace"))
                if path.exists()
                else {}
            )
        page_terms[page] = {
            lang: [t[a:b] for t, spans in parsed[lang].values() for a, b, _ in spans] for lang in langs
        }
        for paragraph, (_, marks) in parsed[langs[0]].items():
            if not marks or any(paragraph not in parsed[lang] for lang in langs):
                continue
            items += align_marks(
                {lang: parsed[lang][paragraph] for lang in langs}, f"lo:{page}#{paragraph}", page
            )
    return with_distractors(items, page_terms)


def split_by_page(
    items: list[ClozeItem], validation_share: float = 0.3
) -> tuple[list[ClozeItem], list[ClozeItem]]:
    """(validation, test): whole pages go to one side (a stable hash of the page path decides)."""
    import hashlib

    def bucket(page: str) -> float:
        return int(hashlib.sha256(page.encode()).hexdigest()[:8], 16) / 16**8

    validation = [item for item in items if bucket(item.page) < validation_share]
    test = [item for item in items if bucket(item.page) >= validation_share]
    return validation, test


def finetune_texts(items: list[ClozeItem], langs: list[str], shots: int, seed: int) -> list[dict]:
    """Training texts in the protocol's format with the answer in the expected language: for every item
    and non-English language L, the prompts of scenarios 2–4 followed by L's term."""
    rng = random.Random(seed)
    out = []
    for item in items:
        for lang in langs:
            if lang == "en":
                continue
            for scenario in ("2", "3", "4"):
                demo_lang, query_lang, expected = scenario_languages(scenario, lang)
                demos = [
                    (d.prefix[demo_lang], d.term[demo_lang]) for d in choose_demos(items, item, shots, rng)
                ]
                prompt = build_prompt(demos, item.prefix[query_lang])
                out.append(
                    {"text": prompt + answer_text(item.prefix[query_lang], item.term[expected]), "lang": lang}
                )
    return out
