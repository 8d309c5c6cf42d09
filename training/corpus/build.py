"""Build the project's multilingual corpus: a `datasets.DatasetDict` saved to disk.

Splits:
- `parallel`: held-out paragraphs present in *every* language (same `parallel_id`), never trained on;
  later work uses them for cross-lingual similarity, steering prompts and language-consistency evals.
- `validation`: a random held-out share of the remaining paragraphs per language (validation loss).
- `train`: the rest.
Columns: `text`, `lang`, `source`, `parallel_id` (None where unaligned), `detected_lang`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from training import langid
from training.config import atomic_write_json, atomic_write_text, config_to_dict
from training.corpus.catalogs import GAMES, CatalogSource
from training.corpus.cleaning import (
    UNSPACED,
    LeakIndex,
    drop_cross_source_near_duplicates,
    wrong_script,
)
from training.corpus.ddtp import DDTPSource
from training.corpus.manuals import MANUALS, ManualSource
from training.corpus.sources import HFDatasetSource, Paragraph, PlainTextSource, TextSource
from training.errors import UnknownLanguage, UserError

DEFAULT_LANGS = ["en", "fr", "de", "es", "ru", "zh", "eu"]
COLUMNS = ["text", "lang", "source", "parallel_id", "detected_lang"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLCLT_CACHE", Path.home() / ".cache" / "multilingual-clt"))


def default_corpus_dir() -> Path:
    return default_cache_dir() / "corpus" / "all-sources-7lang"


@dataclass
class CorpusConfig:
    """Build a multilingual corpus (DatasetDict on disk) from Debian's LibreOffice help and other sources."""

    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()), metadata={"help": "where to save the DatasetDict"}
    )
    cache_dir: str = field(
        default_factory=lambda: str(default_cache_dir()),
        metadata={"help": "cache for downloaded .deb files and extracted trees"},
    )
    langs: list[str] = field(
        default_factory=lambda: list(DEFAULT_LANGS), metadata={"help": "comma-separated language codes"}
    )
    sources: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "text sources: libreoffice (paragraph-parallel help, the held-out parallel split), game "
            "translation catalogs (" + ", ".join(GAMES) + "), manuals (" + ", ".join(MANUALS) + "), ddtp "
            "(package descriptions); 'all' (default) = every one"
        },
    )
    min_chars: int = field(
        default=40,
        metadata={"help": "sources other than libreoffice: drop strings shorter than this (12 for zh/ja)"},
    )
    libreoffice_subdirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "only these folders under text/ (e.g. shared/optionen) for quick slices; empty = all"
        },
    )
    text_files: list[str] = field(
        default_factory=list,
        metadata={"help": "extra plain-text files as lang=path, paragraphs separated by blank lines"},
    )
    hf_dataset: str | None = field(
        default=None, metadata={"help": "extra source: a datasets.load_dataset path or hub name"}
    )
    hf_config: str | None = field(default=None, metadata={"help": "its config name"})
    hf_split: str = field(default="train", metadata={"help": "its split"})
    hf_text_column: str = field(default="text", metadata={"help": "its text column"})
    hf_lang: str | None = field(
        default=None, metadata={"help": "language of every row (or use --hf-lang-column)"}
    )
    hf_lang_column: str | None = field(default=None, metadata={"help": "column with each row's language"})
    hf_max_rows: int | None = field(default=None, metadata={"help": "read at most this many rows"})
    n_parallel: int = field(default=1000, metadata={"help": "held-out parallel paragraphs per language"})
    min_parallel_chars: int = field(
        default=40,
        metadata={"help": "held-out parallel paragraphs must be at least this long in every language"},
    )
    val_fraction: float = field(
        default=0.02, metadata={"help": "share of non-parallel paragraphs held out for validation loss"}
    )
    min_script_share: float = field(
        default=0.6,
        metadata={"help": "drop paragraphs with less than this share of letters in their language's script"},
    )
    require_langid_match: bool = field(
        default=True,
        metadata={
            "help": "drop paragraphs the language identifier assigns to another language or cannot decide"
        },
    )
    reference_lang: str = field(
        default="en",
        metadata={
            "help": "aligned paragraphs identical to this language's are untranslated fallbacks and dropped"
        },
    )
    workers: int = field(default=2, metadata={"help": "processes for parsing"})
    seed: int = field(default=0, metadata={"help": "seed for the held-out selection"})
    overwrite: bool = field(default=False, metadata={"help": "rebuild even if corpus_dir holds a corpus"})


def _parse_libreoffice_lang(args: tuple[str, str, list[str] | None]) -> list[Paragraph]:
    from training.corpus.libreoffice import iter_help_tree

    help_root, lang, subdirs = args
    return list(iter_help_tree(Path(help_root), lang, subdirs or None))


def collect_libreoffice(
    langs: list[str], cache_dir: Path, subdirs: list[str], workers: int
) -> list[Paragraph]:
    from concurrent.futures import ProcessPoolExecutor

    from training.corpus.libreoffice import LibreOfficeHelpSource

    source = LibreOfficeHelpSource(langs, cache_dir, subdirs or None)
    jobs = [
        (str(source.help_root(lang)), lang, subdirs) for lang in tqdm(langs, desc="fetch libreoffice-help")
    ]
    paragraphs: list[Paragraph] = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in tqdm(pool.map(_parse_libreoffice_lang, jobs), total=len(jobs), desc="parse help pages"):
            paragraphs.extend(chunk)
    return paragraphs


def drop_untranslated(paragraphs: list[Paragraph], reference_lang: str) -> tuple[list[Paragraph], Counter]:
    """Aligned non-reference paragraphs whose text equals the reference translation are fallbacks."""
    reference = {p.parallel_id: p.text for p in paragraphs if p.lang == reference_lang and p.parallel_id}
    kept, dropped = [], Counter()
    for p in paragraphs:
        if p.lang != reference_lang and p.parallel_id is not None and reference.get(p.parallel_id) == p.text:
            dropped[p.lang] += 1
            continue
        kept.append(p)
    return kept, dropped


def build_corpus(config: CorpusConfig, sources: list[TextSource] | None = None):
    """Build and save the corpus; returns the DatasetDict. Extra `sources` are added to the configured
    ones."""
    import datasets

    out_dir = Path(config.corpus_dir)
    if (out_dir / "dataset_dict.json").exists() and not config.overwrite:
        _check_same_build(out_dir, config)
        return datasets.load_from_disk(str(out_dir))
    langs = list(dict.fromkeys(config.langs))
    if not langs:
        raise ValueError("no languages requested (--langs)")
    cache_dir = Path(config.cache_dir)

    known = ["libreoffice", *GAMES, *MANUALS, "ddtp"]
    names = list(dict.fromkeys(known if config.sources == ["all"] else config.sources))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(f"unknown sources {unknown}; choose from {', '.join(known)} or all")
    paragraphs: list[Paragraph] = []
    if "libreoffice" in names:
        reference_extra = [] if config.reference_lang in langs else [config.reference_lang]
        paragraphs += collect_libreoffice(
            langs + reference_extra, cache_dir, config.libreoffice_subdirs, config.workers
        )
    extra: list[TextSource] = list(sources or [])
    extra += [CatalogSource(game, langs, cache_dir) for game in names if game in GAMES]
    extra += [ManualSource(manual, langs, cache_dir) for manual in names if manual in MANUALS]
    if "ddtp" in names:
        extra.append(DDTPSource(langs, cache_dir))
    if config.text_files:
        files = dict(item.split("=", 1) for item in config.text_files)
        extra.append(PlainTextSource(files))
    if config.hf_dataset:
        extra.append(
            HFDatasetSource(
                config.hf_dataset,
                config.hf_text_column,
                config.hf_lang,
                config.hf_lang_column,
                config.hf_config,
                config.hf_split,
                max_rows=config.hf_max_rows,
            )
        )
    for source in extra:
        read = list(tqdm(source.iter_paragraphs(), desc=f"read {source.name}"))
        # Short UI strings are labels, not prose: only LibreOffice's aligned paragraphs keep short ones.
        paragraphs += [p for p in read if len(p.text) >= (12 if p.lang in UNSPACED else config.min_chars)]

    paragraphs, untranslated = drop_untranslated(paragraphs, config.reference_lang)
    paragraphs = [p for p in paragraphs if p.lang in langs]
    present = {p.lang for p in paragraphs}
    empty = [lang for lang in langs if lang not in present]
    if empty:
        raise ValueError(f"no text found for languages {empty}; languages with text: {sorted(present)}")

    # Deduplicate exact texts per language (the help repeats embedded paragraphs across pages).
    seen: set[tuple[str, str]] = set()
    unique = []
    for p in paragraphs:
        if (p.lang, p.text) not in seen:
            seen.add((p.lang, p.text))
            unique.append(p)
    duplicates = len(paragraphs) - len(unique)
    unique, near_duplicates = drop_cross_source_near_duplicates(unique)
    misfit = [wrong_script(p.text, p.lang, config.min_script_share) for p in unique]
    wrong = Counter(p.lang for p, bad in zip(unique, misfit) if bad)
    unique = [p for p, bad in zip(unique, misfit) if not bad]

    detected = [langid.detect(p.text) for p in tqdm(unique, desc="language id")]
    langid_report = _langid_report(unique, detected)
    rows = [(p, d) for p, d in zip(unique, detected) if d == p.lang or not config.require_langid_match]

    rng = random.Random(config.seed)
    parallel_ids = _choose_parallel_ids(rows, langs, config, rng)
    parallel_texts = {(p.lang, p.text) for p, _ in rows if p.parallel_id in parallel_ids}
    parallel_rows = sorted(
        (r for r in rows if r[0].parallel_id in parallel_ids), key=lambda r: (r[0].parallel_id, r[0].lang)
    )
    rest = [
        r
        for r in rows
        if r[0].parallel_id not in parallel_ids and (r[0].lang, r[0].text) not in parallel_texts
    ]
    # No training or validation text of another source may repeat held-out text (n-gram overlap).
    leak_index = LeakIndex((p.lang, p.text) for p, _ in parallel_rows)
    held_out_source = parallel_rows[0][0].source
    leaks: Counter = Counter()
    clean_rest = []
    for row in rest:
        if leak_index.leaks(row[0].text, row[0].lang):
            leaks[row[0].source] += 1
            if row[0].source != held_out_source:
                continue
        clean_rest.append(row)
    rest = clean_rest
    rng.shuffle(rest)
    # At least one validation paragraph per language: every later stage needs validation loss per language.
    n_val = {
        lang: max(1, int(round(config.val_fraction * sum(1 for p, _ in rest if p.lang == lang))))
        for lang in langs
    }
    taken: Counter = Counter()
    train_rows, val_rows = [], []
    for row in rest:
        lang = row[0].lang
        if taken[lang] < n_val[lang]:
            taken[lang] += 1
            val_rows.append(row)
        else:
            train_rows.append(row)

    corpus = datasets.DatasetDict(
        {
            "train": _to_dataset(train_rows),
            "validation": _to_dataset(val_rows),
            "parallel": _to_dataset(parallel_rows),
        }
    )
    stats = {
        "config": config_to_dict(config),
        "langs": langs,
        "licences": {
            **({"libreoffice": "MPL-2.0"} if "libreoffice" in names else {}),
            **{source.name: getattr(source, "licence", "unknown") for source in extra},
        },
        "untranslated_dropped": dict(untranslated),
        "exact_duplicates_dropped": duplicates,
        "cross_source_near_duplicates_dropped": near_duplicates,
        "wrong_script_dropped": dict(wrong),
        # Paragraphs sharing an n-gram with held-out text; dropped unless from the held-out split's source.
        "held_out_ngram_overlap": {"source_of_held_out": held_out_source, "by_source": dict(leaks)},
        "langid_on_all_cleaned_paragraphs": langid_report,
        # Before the language-ID filter, by length: short headings are where any detector struggles.
        "langid_on_cleaned_short_lt40": _langid_report(*_by_length(unique, detected, short=True)),
        "langid_on_cleaned_long_ge40": _langid_report(*_by_length(unique, detected, short=False)),
        "splits": {name: _split_stats(ds) for name, ds in corpus.items()},
        "train_chars_by_source": _chars_by_source(corpus["train"]),
    }
    _save_atomically(corpus, out_dir, stats)
    return corpus


# Settings that do not change what a corpus holds.
_BUILD_ONLY = ("corpus_dir", "cache_dir", "workers", "overwrite")


def _upgrade_legacy_config(saved: dict) -> dict:
    """Corpora built before `--sources` recorded `libreoffice`/`wesnoth` switches and `out_dir`."""
    saved = dict(saved)
    if "sources" not in saved:
        saved["sources"] = (["libreoffice"] if saved.pop("libreoffice", True) else []) + (
            ["wesnoth"] if saved.pop("wesnoth", False) else []
        )
    saved.pop("out_dir", None)
    saved.setdefault("min_script_share", 0.0)  # built before the script check: none was applied
    return saved


def _check_same_build(out_dir: Path, config: CorpusConfig) -> None:
    """An existing corpus is reused only if it was built with the same settings (else it would silently
    answer for another request)."""
    from training.errors import ConfigMismatch

    stats_path = out_dir / "corpus_stats.json"
    if not stats_path.exists():
        return
    saved = _upgrade_legacy_config(json.loads(stats_path.read_text()).get("config", {}))
    current = json.loads(json.dumps(config_to_dict(config)))
    if saved.get("min_chars") is None and saved.get("sources") == ["libreoffice"]:
        saved["min_chars"] = current["min_chars"]  # only applies to other sources: no difference here
    differing = sorted(
        k for k in set(saved) | set(current) if k not in _BUILD_ONLY and saved.get(k) != current.get(k)
    )
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in differing)
        raise ConfigMismatch(
            f"{out_dir} holds a corpus built with other settings ({details}); use another "
            "--corpus-dir, or --overwrite true to rebuild it"
        )


def _choose_parallel_ids(rows, langs, config: CorpusConfig, rng: random.Random) -> set[str]:
    """The held-out parallel split: paragraphs aligned across every language. It is drawn from the
    LibreOffice help whenever that source is in the corpus, so that adding sources never changes the
    evaluation set (other aligned sources are used only without it)."""
    from training.corpus.libreoffice import SOURCE_NAME as LIBREOFFICE

    eligible = [p for p, _ in rows if p.parallel_id is not None]
    if any(p.source == LIBREOFFICE for p in eligible):
        eligible = [p for p in eligible if p.source == LIBREOFFICE]
    by_id: dict[str, dict[str, str]] = defaultdict(dict)
    for p in eligible:
        by_id[p.parallel_id][p.lang] = p.text
    candidates = sorted(
        pid
        for pid, texts in by_id.items()
        if len(texts) == len(langs) and all(len(t) >= config.min_parallel_chars for t in texts.values())
    )
    if config.n_parallel < 1:
        raise ValueError(
            "n_parallel must be at least 1: the held-out parallel split drives the cross-lingual evaluations"
        )
    if not candidates:
        raise ValueError(
            f"no paragraph of at least {config.min_parallel_chars} characters is aligned across all of "
            f"{langs}; "
            "add an aligned source or lower --min-parallel-chars"
        )
    rng.shuffle(candidates)
    return set(candidates[: config.n_parallel])


def _to_dataset(rows):
    import datasets

    columns = {name: [] for name in COLUMNS}
    for p, detected in rows:
        columns["text"].append(p.text)
        columns["lang"].append(p.lang)
        columns["source"].append(p.source)
        columns["parallel_id"].append(p.parallel_id)
        columns["detected_lang"].append(detected)
    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    return datasets.Dataset.from_dict(columns, features=features)


def _langid_report(paragraphs: list[Paragraph], detected: list[str]) -> dict:
    by_lang: dict[str, Counter] = defaultdict(Counter)
    for p, d in zip(paragraphs, detected):
        by_lang[p.lang][d] += 1
    report = {}
    for lang, counts in sorted(by_lang.items()):
        n = sum(counts.values())
        others = {k: v for k, v in counts.most_common(4) if k not in (lang, langid.UNKNOWN)}
        report[lang] = {
            "n": n,
            "accuracy": counts[lang] / n,
            "unknown": counts[langid.UNKNOWN] / n,
            "confusions": others,
        }
    return report


def _by_length(paragraphs: list[Paragraph], detected: list[str], short: bool, limit: int = 40):
    pairs = [(p, d) for p, d in zip(paragraphs, detected) if (len(p.text) < limit) == short]
    return [p for p, _ in pairs], [d for _, d in pairs]


def _split_stats(dataset) -> dict:
    stats: dict[str, dict] = defaultdict(lambda: {"paragraphs": 0, "chars": 0})
    for lang, text in zip(dataset["lang"], dataset["text"]):
        stats[lang]["paragraphs"] += 1
        stats[lang]["chars"] += len(text)
    return dict(stats)


def _chars_by_source(dataset) -> dict[str, dict[str, int]]:
    """Characters of the (cleaned) split per source and language."""
    chars: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for source, lang, text in zip(dataset["source"], dataset["lang"], dataset["text"]):
        chars[source][lang] += len(text)
    return {source: dict(by_lang) for source, by_lang in sorted(chars.items())}


def _save_atomically(corpus, out_dir: Path, stats: dict) -> None:
    """Save into a sibling temp dir, then swap it in: an interrupted build never leaves a half corpus."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    corpus.save_to_disk(str(tmp))
    atomic_write_json(tmp / "corpus_stats.json", stats)
    atomic_write_text(tmp / "README.md", corpus_summary_markdown(stats))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def corpus_summary_markdown(stats: dict) -> str:
    lines = [
        "# Corpus summary",
        "",
        "Language-ID columns: CLD2's agreement with the source label on all cleaned paragraphs before the",
        "language-ID filter, for paragraphs of at least 40 characters (and all lengths); "
        "`unknown` = undecided.",
        "",
        "| lang | train paragraphs | train chars | validation | parallel | langid acc. ≥40 chars "
        "| unknown ≥40 | langid acc. all | unknown all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    splits = stats["splits"]
    for lang in stats["langs"]:
        acc = stats["langid_on_all_cleaned_paragraphs"].get(lang, {})
        long = stats["langid_on_cleaned_long_ge40"].get(lang, {})
        lines.append(
            f"| {lang} | {splits['train'].get(lang, {}).get('paragraphs', 0)} | "
            f"{splits['train'].get(lang, {}).get('chars', 0)} "
            f"| {splits['validation'].get(lang, {}).get('paragraphs', 0)} | "
            f"{splits['parallel'].get(lang, {}).get('paragraphs', 0)} "
            f"| {long.get('accuracy', float('nan')):.3f} | {long.get('unknown', float('nan')):.3f} "
            f"| {acc.get('accuracy', float('nan')):.3f} | {acc.get('unknown', float('nan')):.3f} |"
        )
    by_source = stats.get("train_chars_by_source", {})
    if by_source:
        licences = stats.get("licences", {})
        lines += [
            "",
            "Training text per source (millions of characters, after cleaning and language ID):",
            "",
            "| source | licence | " + " | ".join(stats["langs"]) + " |",
            "|---|---|" + "---|" * len(stats["langs"]),
        ]
        for source, by_lang in by_source.items():
            cells = [f"{by_lang.get(lang, 0) / 1e6:.2f}" for lang in stats["langs"]]
            licence = licences.get(source, licences.get("libreoffice", "") if "libreoffice" in source else "")
            lines.append(f"| {source} | {licence} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_corpus(path: str | Path):
    """Load a corpus built by `build_corpus`, with a clear error if it is not there."""
    import datasets

    path = Path(path)
    if not (path / "dataset_dict.json").exists():
        raise CorpusNotFound(
            f"no corpus at {path}; build one with `python scripts/build_corpus.py --corpus-dir {path}`"
        )
    return datasets.load_from_disk(str(path))


class CorpusNotFound(UserError, FileNotFoundError):
    """No built corpus at the given directory."""


def unknown_language_message(missing: list[str], present: list[str], split: str) -> str:
    return (
        f"no text in {missing} in the corpus's {split} split (it has {', '.join(sorted(present))}); "
        f"add a language with `python scripts/build_corpus.py --langs "
        f"{','.join(sorted(set(present) | set(missing)))}` "
        "(LibreOffice help must exist for it in Debian) or pass --text-files / --hf-dataset sources"
    )


def require_langs(corpus, langs: list[str], split: str = "parallel") -> None:
    """Fail early, in one line, if the corpus has no text in some of `langs` in `split`."""
    present = sorted(set(corpus[split]["lang"]))
    missing = sorted(set(langs) - set(present))
    if missing:
        raise UnknownLanguage(unknown_language_message(missing, present, split))


def load_corpus_stats(path: str | Path) -> dict:
    return json.loads((Path(path) / "corpus_stats.json").read_text())


def parallel_sets(corpus, langs: list[str]) -> dict[str, dict[str, str]]:
    """The held-out parallel split as {parallel_id: {lang: text}}, only ids present in all `langs`
    (sorted by id, so any seeded selection from it is reproducible)."""
    require_langs(corpus, langs, "parallel")
    split = corpus["parallel"]
    by_id: dict[str, dict[str, str]] = {}
    for text, lang, pid in zip(list(split["text"]), list(split["lang"]), list(split["parallel_id"])):
        if lang in langs:
            by_id.setdefault(pid, {})[lang] = text
    return {pid: texts for pid, texts in sorted(by_id.items()) if len(texts) == len(langs)}
