"""LinguaMap's protocol as a run directory: items, the four scenarios × languages × shots, both scorings,
and a JSON / Markdown / HTML report with a stacked-bar plot (analysis/linguamap.py holds the method).

`run_linguamap(LinguaMapConfig(...))` builds the held-out items once (items.jsonl, with their counts),
then appends one record per (scenario, language, shots, mode) to metrics.jsonl — a killed run resumes,
a changed config is refused (only which scenarios / shots / modes to run and the device may change).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from analysis import linguamap as lm
from training import paths
from training.config import RunDir, atomic_write_text, config_to_dict
from training.errors import UserError

MAY_CHANGE = ("device", "scenarios", "shots", "modes", "finetune_data", "train_subdirs")
KEY = ("scenario", "lang", "shots", "mode")
MODES = ("generation", "likelihood")


@dataclass
class LinguaMapConfig:
    """LinguaMap's four-scenario protocol on the UI-term cloze of the held-out parallel help text."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"], metadata={"help": "languages"}
    )
    scenarios: list[str] = field(default_factory=lambda: list(lm.SCENARIOS), metadata={"help": "1,2,3,4"})
    shots: list[int] = field(
        default_factory=lambda: [0, 1, 3], metadata={"help": "demonstrations per prompt"}
    )
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "generation, likelihood"})
    max_items: int = field(default=300, metadata={"help": "held-out items per (scenario, language, shots)"})
    new_tokens: int = field(default=12, metadata={"help": "generated tokens per item"})
    demo_prefix_chars: int = field(
        default=40, metadata={"help": "demonstrations: the last this many characters before the term"}
    )
    query_prefix_chars: int = field(
        default=80, metadata={"help": "query: the last this many characters before the term"}
    )
    finetune_data: str = field(
        default="",
        metadata={
            "help": "write fine-tuning data here (train texts from non-held-out pages, validation / test "
            "items) for finetune.py --scenario linguamap, instead of evaluating"
        },
    )
    train_subdirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "with --finetune-data: help folders (under text/) whose pages give training items "
            "('' = every folder)"
        },
    )
    run_dir: str = field(default="runs/linguamap", metadata={"help": "output run directory"})
    seed: int = field(default=0, metadata={"help": "item sampling and demonstration seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def load_items(config: LinguaMapConfig, run: RunDir) -> tuple[list[lm.ClozeItem], dict]:
    """The held-out items (built once and saved in the run directory)."""
    from training.corpus.build import default_corpus_dir, load_corpus, require_langs

    path = run.path / "items.jsonl"
    counts_path = run.path / "item_counts.json"
    if path.exists() and counts_path.exists():
        items = [lm.ClozeItem.from_json(json.loads(line)) for line in path.read_text().splitlines()]
        return items, json.loads(counts_path.read_text())
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    require_langs(corpus, config.langs, "parallel")
    items, counts = lm.held_out_items(corpus, config.langs, help_roots(config.langs))
    if not items:
        raise UserError(
            f"no aligned UI-term items in the held-out parallel split for {config.langs}: the corpus needs "
            "LibreOffice help paragraphs in its parallel split (build_corpus.py --sources libreoffice,...)"
        )
    atomic_write_text(path, "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in items))
    atomic_write_text(counts_path, json.dumps(counts, indent=2))
    return items, counts


def prepare_finetune_data(config: LinguaMapConfig) -> dict:
    """Fine-tuning data for the linguamap scenario: the held-out items split by page into validation
    (chooses the learning rate) and test, and training texts built from pages holding no held-out
    paragraph at all."""
    from training.corpus.build import default_corpus_dir, load_corpus

    run = RunDir.open(config.run_dir, config, may_change=MAY_CHANGE)
    items, counts = load_items(config, run)
    validation, test = lm.split_by_page(items)
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    held_out_pages = {
        lm.page_and_paragraph(pid)[0]
        for pid in corpus["parallel"]["parallel_id"]
        if lm.page_and_paragraph(pid)
    }
    train_items = lm.training_items(
        help_roots(config.langs), config.langs, held_out_pages, subdirs=config.train_subdirs or None
    )
    texts = lm.finetune_texts(train_items, config.langs, shots=3, seed=config.seed)
    out = Path(config.finetune_data)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("train", texts),
        ("validation", [i.to_json() for i in validation]),
        ("test", [i.to_json() for i in test]),
    ):
        atomic_write_text(
            out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    meta = {
        "held_out_items": counts,
        "validation_items": len(validation),
        "test_items": len(test),
        "train_items": len(train_items),
        "train_texts": len(texts),
        "held_out_pages_excluded": len(held_out_pages),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def help_roots(langs: list[str]) -> dict[str, Path]:
    from training.corpus.build import default_cache_dir
    from training.corpus.libreoffice import LibreOfficeHelpSource

    source = LibreOfficeHelpSource(langs, default_cache_dir())
    return {lang: source.help_root(lang) for lang in langs}


def scenario_prompts(
    items: list[lm.ClozeItem],
    scenario: str,
    lang: str,
    shots: int,
    seed: int,
    demo_chars: int = 40,
    query_chars: int = 80,
) -> list[tuple[lm.ClozeItem, str, str, str]]:
    """(item, prompt, expected language, query language) for every item whose term in the expected
    language differs from English's, demonstrations seeded per item, prefixes cut to their last
    `demo_chars` / `query_chars` characters."""
    demo_lang, query_lang, expected = lm.scenario_languages(scenario, lang)
    out = []
    for index, item in enumerate(items):
        if not lm.tells_apart(item, expected):
            continue  # an untranslated term cannot show the answer's language
        rng = random.Random(f"{seed}:{scenario}:{lang}:{shots}:{index}")
        demos = [
            (lm.truncate_prefix(d.prefix[demo_lang], demo_chars), d.term[demo_lang])
            for d in lm.choose_demos(items, item, shots, rng)
        ]
        query = lm.truncate_prefix(item.prefix[query_lang], query_chars)
        out.append((item, lm.build_prompt(demos, query), expected, query_lang))
    return out


def evaluate_cell(model, tokenizer, prompts, mode: str, new_tokens: int) -> dict:
    """Outcome shares of one (scenario, language, shots) cell under one scoring mode."""
    from training.evaluate import generate_continuations

    limit = model.config.n_positions
    fits = [
        p
        for p in prompts
        if len(tokenizer(p[1], add_special_tokens=False)["input_ids"]) + 1 + new_tokens <= limit
    ]
    skipped = len(prompts) - len(fits)
    examples, other_detected = [], {}
    if not fits:
        outcomes = []
    elif mode == "generation":
        device = next(model.parameters()).device
        _, continuations, _ = generate_continuations(
            model, tokenizer, [p[1] for p in fits], None, new_tokens, greedy=True, device=device, pad=True
        )
        outcomes = [lm.classify(c, item, expected) for (item, _, expected, _), c in zip(fits, continuations)]
        other_detected = lm.other_verdicts(continuations, outcomes)
        examples = [
            {"prompt": p[1][-80:], "expected": p[0].term[p[2]], "continuation": c, "outcome": o}
            for p, c, o in list(zip(fits, continuations, outcomes))[:3]
        ]
    else:
        outcomes, chance = [], []
        for item, prompt, expected, query_lang in fits:
            distractors = item.distractors.get(expected, [])[:5]
            contrast = item.term[lm.contrast_language(expected, query_lang)]
            if len(distractors) < 3 or contrast == item.term[expected]:
                skipped += 1
                continue
            space = item.prefix[query_lang]
            candidates = [lm.answer_text(space, t) for t in [item.term[expected], contrast, *distractors]]
            outcomes.append(lm.likelihood_outcome(lm.candidate_scores(model, tokenizer, prompt, candidates)))
            chance.append(1 / len(candidates))
        examples = [{"chance_correct": sum(chance) / max(1, len(chance))}]  # a uniform ranker's share
    result = {**lm.shares(outcomes), "skipped": skipped, "examples": examples}
    if mode == "generation":
        result["other_detected"] = other_detected
    return result


def protocol_jobs(langs: list[str], scenarios, shots, modes) -> list[tuple[str, str, int, str]]:
    """(scenario, language, shots, mode) cells: scenario 1 (all English) once, the others per language."""
    return [
        (scenario, lang, k, mode)
        for scenario in scenarios
        for lang in (["en"] if scenario == "1" else [l for l in langs if l != "en"])
        for k in shots
        for mode in modes
    ]


def run_linguamap(config: LinguaMapConfig) -> dict:
    from training.models import load_model

    for name, values, allowed in (
        ("scenarios", config.scenarios, lm.SCENARIOS),
        ("modes", config.modes, MODES),
    ):
        bad = sorted(set(values) - set(allowed))
        if bad:
            raise UserError(f"unknown {name} {bad}; choose from {allowed}")
    if "en" not in config.langs:
        raise UserError(
            "the protocol's scenarios use English demonstrations or queries: include en in --langs"
        )
    run = RunDir.open(config.run_dir, config, may_change=MAY_CHANGE)
    items, counts = load_items(config, run)
    rng = random.Random(config.seed)
    chosen = rng.sample(items, min(config.max_items, len(items)))
    model, tokenizer = load_model(config.model_dir, config.device)
    done = run.keyed(KEY)
    jobs = protocol_jobs(config.langs, config.scenarios, config.shots, config.modes)
    for scenario, lang, shots, mode in tqdm(
        [j for j in jobs if j not in done], desc="linguamap", unit="cell"
    ):
        prompts = scenario_prompts(
            chosen, scenario, lang, shots, config.seed, config.demo_prefix_chars, config.query_prefix_chars
        )
        result = evaluate_cell(model, tokenizer, prompts, mode, config.new_tokens)
        run.log_metrics({"scenario": scenario, "lang": lang, "shots": shots, "mode": mode, **result})
    records = [r for key, r in run.keyed(KEY).items() if key in set(jobs)]
    result = {
        "config": config_to_dict(config),
        "item_counts": counts,
        "n_items_used": len(chosen),
        "cells": records,
    }
    write_report(run.path, result, config)
    return result


def scenario_means(cells: list[dict]) -> list[dict]:
    """Per (mode, scenario, shots): each outcome share averaged over the languages' cells (equal weight
    per language), and for generation the share of all answers that the judge calls English — in
    scenarios 2–4 English text that is not the English term is counted "other", yet it is the
    language drift the consistency bottleneck is about."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        if cell["n"] > 0:
            groups.setdefault((cell["mode"], cell["scenario"], cell["shots"]), []).append(cell)
    means = []
    for (mode, scenario, shots), group in sorted(groups.items()):
        line = {"mode": mode, "scenario": scenario, "shots": shots, "langs": [c["lang"] for c in group]}
        line.update({o: sum(c[o] for c in group) / len(group) for o in lm.OUTCOMES})
        if mode == "generation":
            line["other_english"] = sum(c.get("other_detected", {}).get("en", 0.0) for c in group) / len(
                group
            )
        means.append(line)
    return means


def write_report(run_dir: Path, result: dict, config: LinguaMapConfig) -> None:
    from analysis.render import Report

    report = Report(f"LinguaMap protocol: {config.model_dir}")
    counts = result["item_counts"]
    report.text(
        f"Held-out items: {counts['items']} aligned UI terms from {counts['with_marks']} parallel "
        f"paragraphs with marks ({counts['misaligned']} dropped: the languages mark different spans; "
        f"{counts['text_mismatch']} dropped: page text differs from the corpus); "
        f"{result['n_items_used']} used per cell."
    )
    result["means"] = scenario_means(result["cells"])
    for mode in config.modes:
        english = ["other: English"] if mode == "generation" else []
        report.table(
            f"Means over languages ({mode}; scenario 1: English only)",
            ["scenario", "shots", "languages", *lm.OUTCOMES, *english],
            [
                [m["scenario"], m["shots"], " ".join(m["langs"])]
                + [f"{m[o]:.3f}" for o in lm.OUTCOMES]
                + ([f"{m['other_english']:.3f}"] if english else [])
                for m in result["means"]
                if m["mode"] == mode
            ],
        )
    for mode in config.modes:
        rows = []
        for r in sorted(
            (r for r in result["cells"] if r["mode"] == mode),
            key=lambda r: (r["scenario"], r["lang"], r["shots"]),
        ):
            verdicts = r.get("other_detected", {})  # generation only (and absent from older runs)
            rows.append(
                [r["scenario"], r["lang"], r["shots"], r["n"], r["skipped"]]
                + [f"{r[o]:.3f}" for o in lm.OUTCOMES]
                + (
                    [", ".join(f"{k} {v:.2f}" for k, v in list(verdicts.items())[:3])]
                    if mode == "generation"
                    else []
                )
            )
        report.table(
            f"Outcome shares ({mode})",
            ["scenario", "lang", "shots", "n", "skipped", *lm.OUTCOMES]
            + (["other: the judge's verdicts"] if mode == "generation" else []),
            rows,
        )
    plot = Path(run_dir) / "outcomes.png"
    plot_outcomes(result["cells"], config, plot)
    report.image("Outcomes per scenario and language (most shots)", plot)
    report.write(Path(run_dir), result)


def plot_outcomes(cells: list[dict], config: LinguaMapConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = max(config.shots)
    colours = {
        "correct": "#2a9d8f",
        "other_language": "#e9c46a",
        "wrong_expected_language": "#e76f51",
        "other": "#bbb",
    }
    fig, axes = plt.subplots(
        len(config.modes),
        len(config.scenarios),
        figsize=(3.2 * len(config.scenarios), 3 * len(config.modes)),
        squeeze=False,
    )
    for row, mode in enumerate(config.modes):
        for col, scenario in enumerate(config.scenarios):
            ax = axes[row][col]
            mine = sorted(
                (c for c in cells if c["mode"] == mode and c["scenario"] == scenario and c["shots"] == shots),
                key=lambda c: c["lang"],
            )
            bottom = [0.0] * len(mine)
            for outcome in lm.OUTCOMES:
                values = [c[outcome] for c in mine]
                ax.bar(
                    [c["lang"] for c in mine], values, bottom=bottom, color=colours[outcome], label=outcome
                )
                bottom = [b + v for b, v in zip(bottom, values)]
            demo, query, expected = lm.scenario_languages(scenario, "L")
            ax.set_title(f"{mode}: ({scenario}) {demo} demos, {query} query → {expected}", fontsize=8)
            ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
