"""A steering sweep as a run directory: language pairs × methods × strengths, evaluated and summarised.

`run_steering(SteerConfig(...))` loads the model and CLT (one loader), takes language features and
LAPE neurons from `located.json` or locates them on the spot with locate_language's default rules,
evaluates each (pair, method, strength) on held-out prompts (interventions/steering.py) and appends one
record per configuration to the run directory, so a killed run resumes; a run directory holding another
model, CLT, located file or evaluation setting is refused (only which pairs, methods and strengths to
run may change). Writes summary.json, summary.md and dose_response.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

from tqdm import tqdm

from analysis.located import load_located
from analysis.text_blocks import blocks_by_lang, prompt_blocks, texts_by_lang
from interventions.steering import evaluate, language_units, plan, sae_language_latents
from training import paths
from training.config import RunDir, atomic_write_json, atomic_write_text, config_to_dict
from training.corpus.build import default_corpus_dir, load_corpus, require_langs
from training.errors import UserError

# Which steps to run may change between runs of one directory; everything else defines the results.
MAY_CHANGE = ("device", "source", "target", "pairs", "langs", "methods", "strengths")
KEY = ("source", "target", "method", "strength")


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
        default="", metadata={"help": "'all': every ordered pair of --langs instead of --from/--to"}
    )
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"],
        metadata={"help": "languages for --pairs all"},
    )
    methods: list[str] = field(
        default_factory=lambda: ["clt", "random", "diffmean", "lape"],
        metadata={"help": "clt, random, diffmean, lape, sae"},
    )
    sae: str = field(
        default="",
        metadata={"help": "residual SAE (sae-lens dir from scripts/train_sae.py) for the 'sae' method"},
    )
    strengths: list[float] = field(
        default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0], metadata={"help": "dose-response strengths"}
    )
    n_prompts: int = field(default=100, metadata={"help": "held-out prompts per pair"})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length (tokens after BOS)"})
    new_tokens: int = field(default=24, metadata={"help": "continuation length"})
    n_ctx: int = field(default=64, metadata={"help": "block length for the language means"})
    blocks_per_lang: int = field(
        default=48, metadata={"help": "validation blocks per language for the means"}
    )
    run_dir: str = field(default="runs/steer", metadata={"help": "output run directory"})
    seed: int = field(default=0, metadata={"help": "random-control seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def steering_pairs(config: SteerConfig) -> list[tuple[str, str]]:
    return list(permutations(config.langs, 2)) if config.pairs == "all" else [(config.source, config.target)]


def run_steering(config: SteerConfig) -> dict:
    from clt.export import load_model_and_clt

    pairs = steering_pairs(config)
    languages = sorted({l for pair in pairs for l in pair})
    run = RunDir.open(config.run_dir, config, may_change=MAY_CHANGE)
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    for split in ("parallel", "validation"):  # before loading anything: an unknown language fails at once
        require_langs(corpus, languages, split)
    model, tokenizer, clt = load_model_and_clt(config.model_dir, config.clt, config.device)
    if Path(config.located).exists():
        located = load_located(config.located, model=model, clt=clt, model_dir=config.model_dir)
        missing = sorted(set(languages) - set(located["langs"]))
        if missing:
            raise UserError(
                f"{config.located} has no units for {missing}; run locate_language.py with those languages"
            )
    else:
        print(
            f"{config.located} not found: locating language features and LAPE neurons now "
            "(scripts/locate_language.py does this once, with a full report)"
        )
        located = locate_units(model, tokenizer, clt, corpus, languages, config)
    means_blocks = blocks_by_lang(
        tokenizer, texts_by_lang(corpus["validation"], languages), config.n_ctx, config.blocks_per_lang
    )
    units = language_units(
        model,
        clt,
        means_blocks,
        {l: located["features"].get(l, []) for l in languages},
        {l: located["neurons"].get(l, []) for l in languages},
    )
    if "sae" in config.methods:
        if not config.sae:
            raise UserError("--methods includes sae: pass --sae DIR (train one with scripts/train_sae.py)")
        from interventions.sae import load_sae, sae_layer

        units.sae, units.sae_layer = load_sae(config.sae), sae_layer(config.sae)
        units.sae_features, units.sae_means = sae_language_latents(
            model, units.sae, units.sae_layer, means_blocks
        )
    parallel_texts = texts_by_lang(corpus["parallel"], languages)
    prompts = {
        l: prompt_blocks(tokenizer, parallel_texts[l], config.prompt_tokens, config.n_prompts)
        for l in languages
    }

    done = run.keyed(KEY)
    jobs = [(s, t, "none", 0.0) for s, t in pairs]
    jobs += [(s, t, m, strength) for s, t in pairs for m in config.methods for strength in config.strengths]
    for source, target, method, strength in tqdm(
        [j for j in jobs if j not in done], desc="steering", unit="config"
    ):
        try:
            edits = (
                []
                if method == "none"
                else plan(method, source, target, strength, units, clt, seed=config.seed)
            )
        except ValueError as error:  # e.g. a language without features: recorded, not fatal
            run.log_metrics(
                {
                    "source": source,
                    "target": target,
                    "method": method,
                    "strength": strength,
                    "error": str(error),
                }
            )
            continue
        result = evaluate(model, tokenizer, clt, edits, prompts[source], source, target, config.new_tokens)
        run.log_metrics(
            {
                "source": source,
                "target": target,
                "method": method,
                "strength": strength,
                "n_edits": len(edits),
                **result,
            }
        )
    # Only this invocation's configurations: a directory may hold more pairs or strengths from earlier runs.
    wanted = set(jobs)
    records = [r for key, r in run.keyed(KEY).items() if key in wanted and "error" not in r]
    summary = summarize(records, pairs, config.methods)
    atomic_write_json(run.path / "summary.json", {"config": config_to_dict(config), **summary})
    atomic_write_text(run.path / "summary.md", summary_markdown(summary))
    plot_dose_response(records, config.methods, run.path / "dose_response.png")
    return summary


def locate_units(model, tokenizer, clt, corpus, langs: list[str], config: SteerConfig) -> dict:
    """Language features and LAPE neurons with locate_language.py's default rules (same functions)."""
    from analysis.language_features import feature_activation_probability, language_features
    from analysis.lape import lape_select, neuron_activation_probability
    from analysis.token_language import corpus_texts_by_lang

    texts = corpus_texts_by_lang(config.corpus_dir, langs, "train", 3000, config.seed)
    blocks = blocks_by_lang(tokenizer, texts, config.n_ctx, 10**9)
    catalogue = language_features(feature_activation_probability(model, clt, blocks), langs)
    neurons = lape_select(neuron_activation_probability(model, blocks), langs, 0.01)["by_lang"]
    return {
        "features": {l: [[f["layer"], f["feature"]] for f in items] for l, items in catalogue.items()},
        "neurons": {l: [list(u) for u in units] for l, units in neurons.items()},
    }


def summarize(records: list[dict], pairs: list[tuple[str, str]], methods: list[str]) -> dict:
    by_key = {(r["source"], r["target"], r["method"], r["strength"]): r for r in records}
    table = {}
    for source, target in pairs:
        row = {"none": by_key.get((source, target, "none", 0.0))}
        for method in methods:
            candidates = [r for (s, t, m, _), r in by_key.items() if (s, t, m) == (source, target, method)]
            row[method] = (
                max(candidates, key=lambda r: (r["fluent_success"], r["success"], -r["strength"]))
                if candidates
                else None
            )
        table[f"{source}->{target}"] = row
    mean_success = {}
    for method in ["none"] + methods:
        values = [
            (row[method]["success"], row[method]["fluent_success"])
            for row in table.values()
            if row.get(method)
        ]
        mean_success[method] = (
            {
                "success": sum(v[0] for v in values) / len(values),
                "fluent_success": sum(v[1] for v in values) / len(values),
            }
            if values
            else None
        )
    dose = {}
    for method in methods:
        for strength in sorted({r["strength"] for r in records if r["method"] == method}):
            rows = [r for r in records if r["method"] == method and r["strength"] == strength]
            dose.setdefault(method, []).append(
                {
                    "strength": strength,
                    "success": sum(r["success"] for r in rows) / len(rows),
                    "fluent_success": sum(r["fluent_success"] for r in rows) / len(rows),
                    "distinct": sum(r["distinct"] for r in rows) / len(rows),
                    "retention": sum(r["retention"] for r in rows) / len(rows),
                    "continuation_loss": sum(r["continuation_loss"] for r in rows) / len(rows),
                    "prompt_kl": sum(r["prompt_kl"] for r in rows) / len(rows),
                }
            )
    return {
        "best_per_pair": {
            pair: {
                m: (
                    {
                        k: r[k]
                        for k in (
                            "strength",
                            "success",
                            "success_ci",
                            "fluent_success",
                            "fluent_success_ci",
                            "distinct",
                            "retention",
                            "continuation_loss",
                            "prompt_kl",
                        )
                    }
                    if r
                    else None
                )
                for m, r in row.items()
            }
            for pair, row in table.items()
        },
        "mean_best_success": mean_success,
        "dose_response": dose,
    }


def summary_markdown(summary: dict) -> str:
    methods = [m for m in next(iter(summary["best_per_pair"].values()))]
    lines = [
        "Fluent swap success (target language and ≥ 50% distinct tokens) at each method's best strength, "
        "with its 95%",
        "Wilson interval; plain CLD2 success and source retention in brackets:",
        "",
        "| pair | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for pair, row in summary["best_per_pair"].items():
        cells = []
        for method in methods:
            r = row.get(method)
            cells.append(
                "—"
                if r is None
                else f"{r['fluent_success']:.2f} [{r['fluent_success_ci'][0]:.2f}, "
                f"{r['fluent_success_ci'][1]:.2f}] @{r['strength']:g} ({r['success']:.2f}, "
                f"{r['retention']:.2f})"
            )
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean over pairs (fluent success / CLD2 success): "
        + ", ".join(
            f"{m} {v['fluent_success']:.3f} / {v['success']:.3f}"
            for m, v in summary["mean_best_success"].items()
            if v is not None
        ),
    ]
    return "\n".join(lines) + "\n"


def plot_dose_response(records: list[dict], methods: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for method in methods:
        strengths = sorted({r["strength"] for r in records if r["method"] == method})
        if not strengths:
            continue
        for ax, key in zip(axes, ("success", "fluent_success", "retention", "continuation_loss")):
            values = [
                sum(r[key] for r in records if r["method"] == method and r["strength"] == s)
                / max(1, sum(1 for r in records if r["method"] == method and r["strength"] == s))
                for s in strengths
            ]
            ax.plot(strengths, values, "-o", label=method)
            ax.set_xlabel("strength")
            ax.set_title(
                {
                    "success": "swap success (CLD2: target language)",
                    "fluent_success": "fluent swap success (≥ 50% distinct tokens)",
                    "retention": "source-language retention",
                    "continuation_loss": "unsteered model's loss on continuation",
                }[key],
                fontsize=9,
            )
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
