"""A steering sweep as a run directory: pairs × methods × strengths × decodings, evaluated and
compared on a fluency-matched frontier (interventions/frontier.py).

`run_steering(SteerConfig(...))` loads the model and CLT (one loader), takes feature sets and LAPE
neurons from `located.json` or locates them on the spot with locate_language's rules, evaluates each
(pair, method, strength, decoding) on held-out prompts (interventions/steering.py) and appends one
record per configuration to the run directory, so a killed run resumes; a run directory holding another
model, CLT, located file, recipe or evaluation setting is refused (only which pairs, methods and
strengths to run may change). Writes summary.json, summary.md, frontier.png and dose_response.png.

Prompts come from the first half of each language's paragraphs in the corpus's parallel split (feature
selection reads only the second half), or from a user's JSONL file (`--prompts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import torch
from tqdm import tqdm

from analysis.feature_selection import STRATEGIES
from analysis.located import load_located
from analysis.text_blocks import blocks_by_lang, evaluation_half, prompt_blocks, texts_by_lang
from interventions.frontier import (
    dose_table,
    frontier,
    frontier_markdown,
    plot_frontier,
    span_diagnostics,
    span_markdown,
)
from interventions.steering import (
    RECIPES,
    Recipe,
    evaluate,
    language_units,
    parse_method,
    plan,
    sae_language_latents,
)
from training import paths
from training.config import RunDir, atomic_write_json, atomic_write_text, config_to_dict
from training.corpus.build import default_corpus_dir, load_corpus, require_langs
from training.errors import UserError
from training.fingerprint import input_fingerprints

# Which steps to run may change between runs of one directory; everything else defines the results.
MAY_CHANGE = ("device", "prompt", "source", "target", "pairs", "langs", "methods", "strengths", "decodings")
KEY = ("source", "target", "method", "strength", "decoding")

# Strength grids (≥ 8 values each) when --strengths is not given, by what the strength multiplies.
# Dense where the fluency budgets are crossed: on the balanced base model every method went from Δ loss
# ≈ 0.3–0.6 to ≈ 1.3–2.4 nats between two neighbours of the first, coarser grids (mean 0.5 → 1, direction
# 0.5 → 0.75), so success at Δ loss ≤ 1 was an interpolation across one wide step. The grids are
# supersets of those first ones (results computed with them stay valid points of the same paths).
STRENGTHS = {
    # × a unit's mean activation
    "mean": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
    "factor": [2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0],  # multiplicative recipes (seed 003)
    # × a residual direction (diffmean, oracle)
    "direction": [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0],
}


@dataclass
class SteerConfig:
    """Swap the output language by intervening on language features; evaluate against controls."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    clt: str = field(default=paths.CLT_DIR, metadata={"help": "CLT directory (native format)"})
    located: str = field(default=paths.LOCATED, metadata={"help": "located units (locate_language.py)"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    source: str = field(default="fr", metadata={"help": "language of the prompts (--from)"})
    target: str = field(default="de", metadata={"help": "language to steer to (--to)"})
    pairs: str = field(
        default="",
        metadata={
            "help": "'all': every ordered pair of --langs, or pairs 'en-fr,fr-de', instead of --from/--to"
        },
    )
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"],
        metadata={"help": "languages for --pairs all"},
    )
    methods: list[str] = field(
        default_factory=lambda: [
            "entropy",
            "output",
            "attribution",
            "aligned",
            "random-output",
            "random-attribution",
            "oracle",
            "diffmean",
        ],
        metadata={
            "help": "entropy, output, attribution, aligned, random-<strategy>, oracle, diffmean, lape, sae "
            "(each optionally @layer)"
        },
    )
    recipe: str = field(default="add", metadata={"help": f"feature edit recipe: {', '.join(RECIPES)}"})
    drive: str | None = field(default=None, metadata={"help": "override the recipe: set, add or scale"})
    suppress: str | None = field(
        default=None, metadata={"help": "override the recipe: none, zero, negative or scale"}
    )
    positions: str | None = field(default=None, metadata={"help": "override the recipe: all, prompt or last"})
    freeze_attention: bool | None = field(default=None, metadata={"help": "override the recipe"})
    min_layer: int | None = field(
        default=None,
        metadata={"help": "override the recipe: features of layers ≥ this (negative: from the end)"},
    )
    sae: str = field(
        default="",
        metadata={"help": "residual SAE (sae-lens dir from scripts/train_sae.py) for the 'sae' method"},
    )
    strengths: list[float] = field(
        default_factory=list, metadata={"help": "strengths for every method (default: a grid per method)"}
    )
    decodings: list[str] = field(
        default_factory=lambda: ["greedy", "sampled"], metadata={"help": "greedy and/or sampled"}
    )
    samples: int = field(default=3, metadata={"help": "sampled continuations per prompt"})
    budgets: list[float] = field(
        default_factory=lambda: [0.5, 1.0], metadata={"help": "fluency budgets (Δ loss, nats/token)"}
    )
    oracle_k: int = field(default=10, metadata={"help": "features in the oracle's fit"})
    diffmean_layer: int | None = field(
        default=None, metadata={"help": "layer for diffmean/oracle (default: busiest entropy-feature layer)"}
    )
    prompts: str = field(
        default="",
        metadata={"help": 'JSONL of {"text": ..., "lang": ...}: evaluate on these prompts instead'},
    )
    prompt: str = field(
        default="",
        metadata={"help": "one prompt: print unsteered vs steered continuations per method (--to)"},
    )
    n_prompts: int = field(default=100, metadata={"help": "held-out prompts per pair"})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length (tokens after BOS)"})
    new_tokens: int = field(default=24, metadata={"help": "continuation length"})
    n_ctx: int = field(default=64, metadata={"help": "block length for the language means"})
    blocks_per_lang: int = field(
        default=48, metadata={"help": "validation blocks per language for the means"}
    )
    run_dir: str = field(default="runs/steer", metadata={"help": "output run directory"})
    seed: int = field(default=0, metadata={"help": "random-control and sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    def resolved_recipe(self) -> Recipe:
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; choose from {sorted(RECIPES)}")
        overrides = {
            name: getattr(self, name)
            for name in ("drive", "suppress", "positions", "freeze_attention", "min_layer")
            if getattr(self, name) is not None
        }
        return Recipe(**{**RECIPES[self.recipe].__dict__, **overrides})

    def strengths_for(self, method: str) -> list[float]:
        if self.strengths:
            return list(self.strengths)
        return STRENGTHS[strength_grid(method, self.resolved_recipe())]


def strength_grid(method: str, recipe: Recipe) -> str:
    """What a method's strength multiplies: a residual direction, a multiplicative factor or a mean."""
    name, _ = parse_method(method)
    if name in ("diffmean", "oracle"):
        return "direction"
    if recipe.drive == "scale" and name != "lape":
        return "factor"
    return "mean"


# The strength --prompt uses per method when --strengths is not given: mid-grid values.
DEMO_STRENGTH = {"mean": 4.0, "factor": 20.0, "direction": 1.0}


def steer_prompt(config: SteerConfig) -> list[dict]:
    """Continue one prompt (in --from's language) unsteered and under each method toward --to, greedily."""
    from clt.export import load_model_and_clt

    recipe = config.resolved_recipe()
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    for split in ("parallel", "validation"):
        require_langs(corpus, [config.source, config.target], split)
    model, tokenizer, clt = load_model_and_clt(config.model_dir, config.clt, config.device)
    ids = prompt_ids(tokenizer, config.prompt, config.source, model.config.n_positions, config.new_tokens)[
        None
    ]
    units = steering_units(config, model, tokenizer, clt, corpus, [config.source, config.target])
    rows = []
    for method in ["none"] + config.methods:
        grid = "mean" if method == "none" else strength_grid(method, recipe)
        strength = config.strengths[0] if config.strengths else DEMO_STRENGTH[grid]
        try:
            plan_ = (
                []
                if method == "none"
                else plan(
                    method,
                    config.source,
                    config.target,
                    strength,
                    units,
                    clt,
                    recipe,
                    ids.shape[1],
                    config.seed,
                    config.diffmean_layer,
                )
            )
        except ValueError as error:
            rows.append({"method": method, "strength": strength, "error": str(error)})
            continue
        result = evaluate(
            model,
            tokenizer,
            clt,
            plan_,
            ids,
            config.source,
            config.target,
            config.new_tokens,
            min_distinct=0.0,
        )
        example = result["examples"][0]
        rows.append({"method": method, "strength": 0.0 if method == "none" else strength, **example})
    return rows


def steering_pairs(config: SteerConfig) -> list[tuple[str, str]]:
    if config.pairs == "all":
        return list(permutations(config.langs, 2))
    if not config.pairs:
        return [(config.source, config.target)]
    pairs = []
    for item in config.pairs.split(","):
        source, dash, target = item.strip().partition("-")
        if not dash or not source or not target or source == target:
            raise UserError(f"--pairs: {item!r} is not a pair like 'en-fr' (source-target, two languages)")
        pairs.append((source, target))
    return pairs


def read_prompt_file(path: str) -> dict[str, list[str]]:
    """A user's prompts, {"text", "lang"} per JSONL line → texts per language."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"prompt file {path} not found")
    by_lang: dict[str, list[str]] = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            text, lang = item["text"], item["lang"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f'{path}:{number}: expected {{"text": ..., "lang": ...}}') from None
        if not str(text).strip():
            raise UserError(f"{path}:{number}: empty prompt: give some text to continue")
        by_lang.setdefault(lang, []).append(text)
    if not by_lang:
        raise UserError(f"{path} holds no prompts")
    return by_lang  # languages are checked against the corpus by the caller


def prompt_ids(
    tokenizer, text: str, lang: str, n_positions: int, new_tokens: int, where: str = ""
) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    label = f"{where}: " if where else ""
    if not text.strip() or not ids:
        raise UserError(f"{label}empty prompt: give some text to continue")
    if len(ids) + 1 + new_tokens > n_positions:
        raise UserError(
            f"{label}the prompt has {len(ids)} tokens; with BOS and {new_tokens} new tokens that exceeds the "
            f"model's context of {n_positions}: shorten it or lower --new-tokens"
        )
    return torch.tensor([tokenizer.bos_token_id] + ids)


def run_steering(config: SteerConfig) -> dict:
    from clt.export import load_model_and_clt

    recipe = config.resolved_recipe()
    for method in config.methods:
        try:
            parse_method(method)
        except ValueError as error:
            raise UserError(str(error)) from None
    run = RunDir.open(config.run_dir, config, may_change=MAY_CHANGE)
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    if config.prompts:
        user_texts = read_prompt_file(config.prompts)
        if config.pairs and config.pairs != "all":  # an explicit list: the pairs whose source has prompts
            pairs = [(s, t) for s, t in steering_pairs(config) if s in user_texts]
        else:
            targets = config.langs if config.pairs == "all" else [config.target]
            pairs = [(s, t) for s in user_texts for t in targets if t != s]
        if not pairs:
            raise UserError(f"the prompts are all in {config.target}: choose another --to (or --pairs all)")
    else:
        user_texts, pairs = None, steering_pairs(config)
    languages = sorted({l for pair in pairs for l in pair})
    for split in ("parallel", "validation"):  # before loading anything: an unknown language fails at once
        require_langs(corpus, languages, split)
    model, tokenizer, clt = load_model_and_clt(config.model_dir, config.clt, config.device)
    run.check_inputs(input_fingerprints(config.model_dir, config.clt, config.located))  # results are reused
    units = steering_units(config, model, tokenizer, clt, corpus, languages)
    if user_texts is not None:
        prompts = {
            lang: _stack(
                [
                    prompt_ids(
                        tokenizer, text, lang, model.config.n_positions, config.new_tokens, config.prompts
                    )
                    for text in texts
                ]
            )
            for lang, texts in user_texts.items()
        }
    else:
        parallel_texts = texts_by_lang(corpus["parallel"], languages)
        prompts = {
            l: prompt_blocks(
                tokenizer, evaluation_half(parallel_texts[l]), config.prompt_tokens, config.n_prompts
            )
            for l in languages
        }

    done = run.keyed(KEY)
    jobs = []
    for decoding in config.decodings:
        for s, t in pairs:
            jobs.append((s, t, "none", 0.0, decoding))
            jobs += [
                (s, t, m, strength, decoding) for m in config.methods for strength in config.strengths_for(m)
            ]
    for source, target, method, strength, decoding in tqdm(
        [j for j in jobs if j not in done], desc="steering", unit="config"
    ):
        key = {
            "source": source,
            "target": target,
            "method": method,
            "strength": strength,
            "decoding": decoding,
        }
        baseline = done.get((source, target, "none", 0.0, decoding))
        try:
            plan_ = (
                []
                if method == "none"
                else plan(
                    method,
                    source,
                    target,
                    strength,
                    units,
                    clt,
                    recipe,
                    prompts[source].shape[1],
                    config.seed,
                    config.diffmean_layer,
                )
            )
        except ValueError as error:  # e.g. a language without features: recorded, not fatal
            run.log_metrics({**key, "error": str(error)})
            continue
        result = evaluate(
            model,
            tokenizer,
            clt,
            plan_,
            prompts[source],
            source,
            target,
            config.new_tokens,
            decoding=decoding,
            samples=config.samples,
            seed=config.seed,
            min_distinct=None if baseline is None else baseline["min_distinct"],
            token_language=units.token_language,
        )
        n_edits = 0 if method == "none" else len(plan_.edits)
        record = {**key, "n_edits": n_edits, **result}
        run.log_metrics(record)
        done[(source, target, method, strength, decoding)] = record  # the unsteered run sets later bars
    # Only this invocation's configurations: a directory may hold more pairs or strengths from earlier runs.
    wanted = set(jobs)
    records = [r for key, r in run.keyed(KEY).items() if key in wanted and "error" not in r]
    summary = summarize(records, pairs, config.methods, config.budgets)
    strategies = [s for s in STRATEGIES if s in units.feature_sets]
    summary["span"] = span_diagnostics(units, clt, pairs, strategies, config.seed)
    atomic_write_json(run.path / "summary.json", {"config": config_to_dict(config), **summary})
    atomic_write_text(
        run.path / "summary.md",
        summary_markdown(summary, config.budgets) + "\n" + span_markdown(summary["span"], config.oracle_k),
    )
    plot_frontier(summary["dose_response"], config.budgets, run.path / "frontier.png")
    return summary


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """A user's prompts of one language as one batch: they must share a length (else the longest
    common length is not meaningful) — so they are cut to the shortest, which is said once."""
    shortest = min(len(r) for r in rows)
    if any(len(r) != shortest for r in rows):
        print(f"prompts cut to the shortest one's {shortest - 1} tokens so they batch together")
    return torch.stack([r[:shortest] for r in rows])


def steering_units(config: SteerConfig, model, tokenizer, clt, corpus, languages: list[str]):
    """Feature sets, LAPE neurons and every language's means (from located.json, or located now)."""
    strategies = sorted(
        {parse_method(m)[0].removeprefix("random-") for m in config.methods} & set(STRATEGIES)
    )
    if Path(config.located).exists():
        located = load_located(config.located, model=model, clt=clt, model_dir=config.model_dir)
        missing = sorted(set(languages) - set(located["langs"]))
        if missing:
            raise UserError(
                f"{config.located} has no units for {missing}; run locate_language.py with those languages"
            )
        feature_sets = located["feature_sets"]
        absent = [s for s in strategies if s not in feature_sets]
        if absent:
            raise UserError(
                f"{config.located} has no feature sets for {absent}: rerun locate_language.py "
                f"(--strategies {','.join(strategies)})"
            )
    else:
        print(
            f"{config.located} not found: locating feature sets and LAPE neurons now "
            "(scripts/locate_language.py does this once, with a full report)"
        )
        located = locate_units(model, tokenizer, clt, corpus, languages, config, strategies)
    means_blocks = blocks_by_lang(
        tokenizer, texts_by_lang(corpus["validation"], languages), config.n_ctx, config.blocks_per_lang
    )
    units = language_units(
        model,
        clt,
        means_blocks,
        {s: {l: sets.get(l, []) for l in languages} for s, sets in located["feature_sets"].items()},
        {l: located["neurons"].get(l, []) for l in languages},
    )
    units.oracle_k = config.oracle_k
    units.token_language = token_language_rows(tokenizer, corpus, languages)
    if any(parse_method(m)[0] == "sae" for m in config.methods):
        if not config.sae:
            raise UserError("--methods includes sae: pass --sae DIR (train one with scripts/train_sae.py)")
        from interventions.sae import load_sae, sae_layer

        units.sae, units.sae_layer = load_sae(config.sae), sae_layer(config.sae)
        units.sae_features, units.sae_means = sae_language_latents(
            model, units.sae, units.sae_layer, means_blocks
        )
    return units


def token_language_rows(tokenizer, corpus, languages: list[str]) -> dict[str, torch.Tensor]:
    """p(lang | token) among these languages, from token counts on the validation split (the split the
    language means come from; never the evaluation prompts)."""
    from analysis.token_language import language_table, token_counts

    table = language_table(token_counts(tokenizer, texts_by_lang(corpus["validation"], languages)))
    return {lang: table[:, k] for k, lang in enumerate(languages)}


def locate_units(model, tokenizer, clt, corpus, langs, config: SteerConfig, strategies: list[str]) -> dict:
    """Feature sets and LAPE neurons with locate_language.py's default rules (same functions)."""
    from analysis.feature_selection import FeatureSelector
    from analysis.feature_selection import units as unit_lists
    from analysis.lape import lape_select, neuron_activation_probability
    from analysis.locate import selection_data

    data = selection_data(tokenizer, corpus, langs, config.corpus_dir, config.n_ctx, config.seed)
    selector = FeatureSelector(model, clt, tokenizer, data, langs)
    neurons = lape_select(neuron_activation_probability(model, data.train_blocks), langs, 0.01)["by_lang"]
    return {
        "feature_sets": {s: unit_lists(selector.select(s)) for s in strategies},
        "neurons": {l: [list(u) for u in units] for l, units in neurons.items()},
    }


def summarize(
    records: list[dict], pairs: list[tuple[str, str]], methods: list[str], budgets: list[float]
) -> dict:
    summary = {
        "frontier": frontier(records, pairs, methods, budgets),
        "dose_response": dose_table(records, methods),
    }
    if records and all("first_token_target" in r for r in records):  # recorded since 2026-12-06
        summary["first_token_frontier"] = frontier(records, pairs, methods, budgets, key="first_token_target")
    return summary


def summary_markdown(summary: dict, budgets: list[float]) -> str:
    lines = [frontier_markdown(summary, budgets), "Dose-response (means over pairs):", ""]
    for decoding, by_method in summary["dose_response"].items():
        lines += [
            f"{decoding}: strength → non-degenerate success / CLD2 success / distinct / retention / "
            "Δ loss / prompt KL [/ first generated token in the target language, where recorded]",
            "",
        ]
        for method, entries in by_method.items():
            cells = ", ".join(
                f"{e['strength']:g}: {e['fluent_success']:.2f}/{e['success']:.2f}/{e['distinct']:.2f}/"
                f"{e['retention']:.2f}/{e['delta_loss']:+.2f}/{e['prompt_kl']:.2f}"
                + (f"/{e['first_token_target']:.2f}" if "first_token_target" in e else "")
                for e in entries
            )
            lines.append(f"- {method}: {cells}")
        lines.append("")
    return "\n".join(lines) + "\n"
