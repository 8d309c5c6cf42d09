"""Where is language decided? The location report as a run directory.

`locate_language(LocateConfig(...))` computes the sections — logit lens, cross-lingual similarity,
layer-ablation sweeps, LAPE neurons, CLT language features, the feature sets of every selection
strategy (analysis/feature_selection.py), probes — each saved to
`sections/<name>.json` when done and reused on a re-run (only which sections to run may change between
runs of one directory), then writes plots, report.{json,md,html} and located.json, the language
neurons / features / layers that steering and fine-tuning read (analysis/located.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from analysis import ablation, lape, lens, probes, similarity
from analysis.feature_selection import STRATEGIES
from analysis.language_features import (
    feature_activation_probability,
    language_features,
    promoted_tokens,
    top_contexts,
)
from analysis.located import feature_aligned_neurons, located_from_sections, save_located
from analysis.report import write_report
from analysis.text_blocks import blocks_by_lang, prompt_blocks, selection_half, texts_by_lang
from analysis.token_language import corpus_texts_by_lang, language_table, token_counts
from training import paths
from training.config import RunDir, atomic_write_json
from training.corpus.build import default_corpus_dir, load_corpus, parallel_sets, require_langs
from training.errors import UserError
from training.fingerprint import input_fingerprints

SECTIONS = ("lens", "similarity", "ablation", "lape", "features", "feature_sets", "probes", "linguamap")


@dataclass
class LocateConfig:
    """Locate the layers, neurons and CLT features that carry language."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    clt: str = field(
        default=paths.CLT_DIR, metadata={"help": "CLT directory for the feature sections ('' = none)"}
    )
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"], metadata={"help": "languages"}
    )
    sections: list[str] = field(
        default_factory=lambda: list(SECTIONS), metadata={"help": f"subset of {','.join(SECTIONS)}"}
    )
    run_dir: str = field(default=paths.LOCATE_RUN_DIR, metadata={"help": "output run directory"})
    n_ctx: int = field(default=64, metadata={"help": "block length (BOS included)"})
    blocks_per_lang: int = field(
        default=48, metadata={"help": "held-out validation blocks per language (lens, ppl, probes)"}
    )
    train_texts_per_lang: int = field(
        default=3000,
        metadata={"help": "training paragraphs per language (token table, LAPE, feature frequencies)"},
    )
    n_parallel: int = field(
        default=100, metadata={"help": "parallel paragraphs for similarity and comprehension loss"}
    )
    prompts_per_lang: int = field(
        default=30, metadata={"help": "prompts per language for continuation consistency"}
    )
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length for continuations"})
    new_tokens: int = field(default=24, metadata={"help": "continuation length"})
    known_lang: str = field(
        default="en", metadata={"help": "language the comprehension-type loss is scored in"}
    )
    lape_fractions: list[float] = field(
        default_factory=lambda: [0.01, 0.05], metadata={"help": "LAPE selection shares"}
    )
    max_entropy_bits: float = field(
        default=0.8, metadata={"help": "language features: entropy of the language mix at most this"}
    )
    min_frequency: float = field(
        default=0.01,
        metadata={"help": "language features: fire on at least this share of the language's tokens"},
    )
    features_per_lang: int = field(default=10, metadata={"help": "catalogue size per language"})
    strategies: list[str] = field(
        default_factory=lambda: list(STRATEGIES),
        metadata={"help": f"feature selection strategies for feature_sets: {', '.join(STRATEGIES)}"},
    )
    attribution_prompts: int = field(
        default=50, metadata={"help": "held-out prompts per language for the attribution strategy"}
    )
    token_min_share: float = field(
        default=0.8, metadata={"help": "output/attribution: a language's tokens have p(lang | token) ≥ this"}
    )
    token_min_count: int = field(
        default=3, metadata={"help": "output/attribution: ... and occur at least this often in its text"}
    )
    linguamap_items: int = field(
        default=100, metadata={"help": "LinguaMap section: held-out cloze items per cell (0, 3 shots)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


@dataclass
class LocateInputs:
    """Everything the sections read: the model (and CLT), and the text blocks, built once."""

    config: LocateConfig
    model: object
    tokenizer: object
    clt: object | None
    validation_texts: dict[str, list[str]]
    validation: dict[str, torch.Tensor]  # held-out blocks per language
    train_texts: dict[str, list[str]]
    train_blocks: dict[str, torch.Tensor]
    parallel: dict[str, dict[str, str]]  # parallel id → {lang: text}

    def stacked_validation(self) -> tuple[torch.Tensor, list[str]]:
        langs = self.config.langs
        return torch.cat([self.validation[l] for l in langs]), [
            l for l in langs for _ in range(len(self.validation[l]))
        ]


def selection_data(
    tokenizer,
    corpus,
    langs: list[str],
    corpus_dir: str | None,
    n_ctx: int,
    seed: int,
    train_texts: dict[str, list[str]] | None = None,
    validation_texts: dict[str, list[str]] | None = None,
    blocks_per_lang: int = 48,
    attribution_prompts: int = 50,
    prompt_tokens: int = 16,
    train_texts_per_lang: int = 3000,
):
    """The text feature selection reads: training blocks, the parallel split after steering's
    evaluation paragraphs, and held-out validation blocks and prompts."""
    from analysis.feature_selection import SelectionData

    if train_texts is None:
        train_texts = corpus_texts_by_lang(corpus_dir, langs, "train", train_texts_per_lang, seed)
    if validation_texts is None:
        validation_texts = texts_by_lang(corpus["validation"], langs)
    translated = {l: selection_half(texts) for l, texts in texts_by_lang(corpus["parallel"], langs).items()}
    short = [l for l, texts in translated.items() if not texts]
    if short:
        raise UserError(f"the parallel split is too small for {short}: rebuild the corpus with a larger one")
    return SelectionData(
        train_blocks=blocks_by_lang(tokenizer, train_texts, n_ctx, 10**9),
        translated_texts=translated,
        validation_blocks=blocks_by_lang(tokenizer, validation_texts, n_ctx, blocks_per_lang),
        attribution_prompts={
            l: prompt_blocks(tokenizer, texts, prompt_tokens, attribution_prompts)
            for l, texts in validation_texts.items()
        },
    )


def load_inputs(config: LocateConfig) -> LocateInputs:
    from clt.export import load_model_and_clt
    from training.models import load_model

    if config.clt:
        model, tokenizer, clt = load_model_and_clt(config.model_dir, config.clt, config.device)
    else:
        (model, tokenizer), clt = load_model(config.model_dir, config.device), None
    langs = config.langs
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    for split in ("validation", "train", "parallel"):
        require_langs(corpus, langs, split)
    validation_texts = texts_by_lang(corpus["validation"], langs)
    train_texts = corpus_texts_by_lang(
        config.corpus_dir, langs, "train", config.train_texts_per_lang, config.seed
    )
    parallel = parallel_sets(corpus, langs)
    return LocateInputs(
        config=config,
        model=model,
        tokenizer=tokenizer,
        clt=clt,
        validation_texts=validation_texts,
        validation=blocks_by_lang(tokenizer, validation_texts, config.n_ctx, config.blocks_per_lang),
        train_texts=train_texts,
        train_blocks=blocks_by_lang(tokenizer, train_texts, config.n_ctx, 10**9),
        parallel={pid: parallel[pid] for pid in sorted(parallel)[: config.n_parallel]},
    )


# --- sections: one function each, inputs → a JSON-able dict ------------------------------------


def lens_section(inputs: LocateInputs) -> dict:
    table = language_table(token_counts(inputs.tokenizer, inputs.train_texts))
    blocks, block_langs = inputs.stacked_validation()
    probabilities, strings = lens.lens_language_probabilities(inputs.model, blocks, table, inputs.tokenizer)
    return lens.lens_report(probabilities, strings, block_langs, inputs.config.langs)


def similarity_section(inputs: LocateInputs) -> dict:
    ids = sorted(inputs.parallel)
    states = {
        lang: similarity.pooled_states(
            inputs.model, inputs.tokenizer, [inputs.parallel[i][lang] for i in ids], inputs.config.n_ctx
        )
        for lang in inputs.config.langs
    }
    return similarity.similarity_report(states)


def ablation_section(inputs: LocateInputs) -> dict:
    config, tokenizer = inputs.config, inputs.tokenizer
    prompts = {
        lang: [
            t
            for t in inputs.validation_texts[lang]
            if len(tokenizer(t, add_special_tokens=False)["input_ids"]) > config.prompt_tokens
        ][: config.prompts_per_lang]
        for lang in config.langs
    }
    known = config.known_lang if config.known_lang in config.langs else config.langs[0]
    return ablation.ablation_sweep(
        inputs.model,
        tokenizer,
        config.langs,
        inputs.validation,
        inputs.parallel,
        prompts,
        known,
        config.prompt_tokens,
        config.new_tokens,
        config.n_ctx,
    )


def lape_section(inputs: LocateInputs) -> dict:
    config = inputs.config
    probabilities = lape.neuron_activation_probability(inputs.model, inputs.train_blocks)
    selections = {
        f"top{fraction:.0%}": lape.lape_select(probabilities, config.langs, fraction)
        for fraction in config.lape_fractions
    }
    first = selections[f"top{config.lape_fractions[0]:.0%}"]
    deactivation = lape.deactivation_matrix(
        inputs.model, first["by_lang"], inputs.validation, seed=config.seed
    )
    return {"selections": selections, "deactivation": deactivation}


def features_section(inputs: LocateInputs) -> dict:
    config, model, clt, tokenizer = inputs.config, inputs.model, inputs.clt, inputs.tokenizer
    probabilities = feature_activation_probability(model, clt, inputs.train_blocks)
    catalogue = language_features(
        probabilities, config.langs, config.max_entropy_bits, config.min_frequency, config.features_per_lang
    )
    chosen = [(f["layer"], f["feature"]) for items in catalogue.values() for f in items]
    contexts = top_contexts(model, clt, tokenizer, inputs.stacked_validation()[0], chosen)
    promotes = promoted_tokens(model, clt, tokenizer, chosen)
    for items in catalogue.values():
        for f in items:
            f["contexts"] = contexts[(f["layer"], f["feature"])]
            f["promotes"] = promotes[(f["layer"], f["feature"])]
    h = lape.entropy(probabilities) / torch.log(torch.tensor(2.0))
    active = torch.isfinite(h)
    max_bits = float(torch.log2(torch.tensor(len(config.langs))))
    return {
        "n_layers": clt.config.n_layers,
        "langs": config.langs,
        "catalogue": catalogue,
        "entropy_histogram_per_layer": [
            torch.histc(h[l][active[l]], bins=10, min=0, max=max_bits).tolist()
            for l in range(clt.config.n_layers)
        ],
        "mean_frequency_per_layer": probabilities.mean((1, 2)).tolist(),
        "aligned_neurons": {
            lang: feature_aligned_neurons(model, clt, [(f["layer"], f["feature"]) for f in items])
            for lang, items in catalogue.items()
        },
    }


def feature_sets_section(inputs: LocateInputs) -> dict:
    """Every selection strategy's ranked feature sets, each feature with what makes it inspectable."""
    from analysis.feature_selection import FeatureSelector

    config = inputs.config
    unknown = sorted(set(config.strategies) - set(STRATEGIES))
    if unknown:
        raise UserError(f"unknown strategies {unknown}; choose from {STRATEGIES}")
    data = selection_data(
        inputs.tokenizer,
        load_corpus(config.corpus_dir or default_corpus_dir()),
        config.langs,
        config.corpus_dir,
        config.n_ctx,
        config.seed,
        inputs.train_texts,
        inputs.validation_texts,
        config.blocks_per_lang,
        config.attribution_prompts,
        config.prompt_tokens,
    )
    selector = FeatureSelector(
        inputs.model,
        inputs.clt,
        inputs.tokenizer,
        data,
        config.langs,
        config.token_min_share,
        config.token_min_count,
    )
    sets = {}
    for strategy in config.strategies:
        print(f"  strategy {strategy}", flush=True)
        rule = (
            {"max_entropy_bits": config.max_entropy_bits, "min_frequency": config.min_frequency}
            if strategy == "entropy"
            else {}
        )
        sets[strategy] = selector.select(strategy, config.features_per_lang, progress=True, **rule)
        selector.describe(sets[strategy], inputs.stacked_validation()[0])
    return {"langs": config.langs, "ln_f_inverse_scale": selector.inverse_scale, "sets": sets}


def probes_section(inputs: LocateInputs) -> dict:
    blocks, block_langs = inputs.stacked_validation()
    return probes.language_probes(
        inputs.model, blocks, block_langs, inputs.config.langs, clt=inputs.clt, seed=inputs.config.seed
    )


def linguamap_section(inputs: LocateInputs) -> dict:
    """LinguaMap's four scenarios at 0 and 3 shots, both scorings (scripts/linguamap.py has every option)."""
    import random

    from analysis import linguamap as lm
    from analysis.linguamap_run import evaluate_cell, help_roots, protocol_jobs, scenario_prompts

    config = inputs.config
    if "en" not in config.langs:
        return {"skipped": "the scenarios need English among --langs"}
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    items, counts = lm.held_out_items(corpus, config.langs, help_roots(config.langs))
    if not items:
        return {"item_counts": counts, "skipped": "no aligned UI-term items in the held-out parallel split"}
    chosen = random.Random(config.seed).sample(items, min(config.linguamap_items, len(items)))
    cells = []
    for scenario, lang, shots, mode in protocol_jobs(
        config.langs, lm.SCENARIOS, [0, 3], ["generation", "likelihood"]
    ):
        prompts = scenario_prompts(chosen, scenario, lang, shots, config.seed)
        result = evaluate_cell(inputs.model, inputs.tokenizer, prompts, mode, 12)
        cells.append({"scenario": scenario, "lang": lang, "shots": shots, "mode": mode, **result})
    return {"item_counts": counts, "n_items_used": len(chosen), "cells": cells}


SECTION_FUNCTIONS = {
    "lens": lens_section,
    "similarity": similarity_section,
    "ablation": ablation_section,
    "lape": lape_section,
    "features": features_section,
    "feature_sets": feature_sets_section,
    "probes": probes_section,
    "linguamap": linguamap_section,
}
PLOTS = {  # section → (title, file, plotting function)
    "lens": (
        "Logit lens: language probability per layer",
        "lens.png",
        lambda s, path: lens.plot_lens(s, path),
    ),
    "similarity": (
        "Cross-lingual similarity per layer",
        "similarity.png",
        lambda s, path: similarity.plot_similarity(s, path),
    ),
    "ablation": ("Layer-ablation sweeps", "ablation.png", lambda s, path: ablation.plot_ablation(s, path)),
    "lape": (
        "LAPE language neurons",
        "lape.png",
        lambda s, path: lape.plot_lape(next(iter(s["selections"].values())), s["deactivation"], path),
    ),
    "probes": ("Linear probes of language", "probes.png", lambda s, path: probes.plot_probes(s, path)),
}


def locate_language(config: LocateConfig) -> dict:
    """Compute (or reuse) every requested section, then write plots, the report and located.json."""
    unknown = sorted(set(config.sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown sections {unknown}; choose from {SECTIONS}")
    run = RunDir.open(config.run_dir, config, may_change=("device", "sections"))
    inputs = load_inputs(config)  # checks the paths first, with one-line errors
    # Sections are reused from disk: make sure the weights behind the same paths are still the same.
    run.check_inputs(input_fingerprints(config.model_dir, config.clt))
    (run.path / "sections").mkdir(exist_ok=True)
    sections = {}
    for name, compute in SECTION_FUNCTIONS.items():
        path = run.path / "sections" / f"{name}.json"
        if path.exists():
            sections[name] = json.loads(path.read_text())
            print(f"[{name}] reused {path}")
        elif name in config.sections and (name not in ("features", "feature_sets") or inputs.clt is not None):
            print(f"[{name}] computing…", flush=True)
            with torch.no_grad():
                sections[name] = compute(inputs)
            atomic_write_json(path, sections[name])
    plots = {}
    for name, (title, filename, plot) in PLOTS.items():
        if name in sections:
            plot(sections[name], run.path / filename)
            plots[title] = run.path / filename
    report_paths = write_report(run.path, sections, plots, f"Where is language decided? {config.model_dir}")
    located = located_from_sections(
        config.model_dir, config.clt or None, config.langs, inputs.model, sections
    )
    save_located(run.path / "located.json", located)
    return {"sections": sections, "report": report_paths, "located": run.path / "located.json"}
