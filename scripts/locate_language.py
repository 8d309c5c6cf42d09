"""Where is language decided? Lenses, similarity, ablation sweeps, LAPE neurons, CLT language features, probes.

    python scripts/locate_language.py                                  # default tiny en-heavy model + its CLT
    python scripts/locate_language.py --model-dir runs/tiny-balanced/model --clt "" --run-dir runs/locate-balanced
    python scripts/locate_language.py --sections lens,similarity       # only some sections

Writes into --run-dir: config.json, sections/<name>.json (each section is saved when done and reused
on a re-run, so a killed run resumes), plots, report.{json,md,html} and located.json — the language
neurons / features / layers that steering and fine-tuning read (analysis/located.py).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analysis import ablation, lape, lens, probes, similarity
from analysis.language_features import (
    feature_activation_probability,
    language_features,
    promoted_tokens,
    top_contexts,
)
from analysis.located import feature_aligned_neurons, layers_by_count, save_located
from analysis.report import write_report
from analysis.text_blocks import blocks_by_lang, texts_by_lang
from analysis.token_language import corpus_texts_by_lang, language_table, token_counts
from clt.activations import model_fingerprint
from training.config import RunDir, atomic_write_json, config_to_dict, parse_config
from training.corpus.build import default_corpus_dir, load_corpus, parallel_sets

SECTIONS = ("lens", "similarity", "ablation", "lape", "features", "probes")


@dataclass
class LocateConfig:
    """Locate the layers, neurons and CLT features that carry language."""

    model_dir: str = field(default="runs/pretrain-tiny-en-heavy/model", metadata={"help": "HF model directory"})
    clt: str = field(default="runs/clt-tiny-en-heavy/clt", metadata={"help": "CLT directory for the feature sections ('' = none)"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    langs: list[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"], metadata={"help": "languages"})
    sections: list[str] = field(default_factory=lambda: list(SECTIONS), metadata={"help": f"subset of {','.join(SECTIONS)}"})
    run_dir: str = field(default="runs/locate-tiny-en-heavy", metadata={"help": "output run directory"})
    n_ctx: int = field(default=64, metadata={"help": "block length (BOS included)"})
    blocks_per_lang: int = field(default=48, metadata={"help": "held-out validation blocks per language (lens, ppl, probes)"})
    train_texts_per_lang: int = field(default=3000, metadata={"help": "training paragraphs per language (token table, LAPE, feature frequencies)"})
    n_parallel: int = field(default=100, metadata={"help": "parallel paragraphs for similarity and comprehension loss"})
    prompts_per_lang: int = field(default=30, metadata={"help": "prompts per language for continuation consistency"})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length for continuations"})
    new_tokens: int = field(default=24, metadata={"help": "continuation length"})
    known_lang: str = field(default="en", metadata={"help": "language the comprehension-type loss is scored in"})
    lape_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05], metadata={"help": "LAPE selection shares"})
    max_entropy_bits: float = field(default=0.8, metadata={"help": "language features: entropy of the language mix at most this"})
    min_frequency: float = field(default=0.01, metadata={"help": "language features: fire on at least this share of the language's tokens"})
    features_per_lang: int = field(default=10, metadata={"help": "catalogue size per language"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = parse_config(LocateConfig, argv)
    unknown = sorted(set(config.sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {SECTIONS}")
    model = AutoModelForCausalLM.from_pretrained(config.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    clt = None
    if config.clt:
        from clt.export import check_matches_model, load_native

        clt, meta = load_native(config.clt)
        check_matches_model(meta, model, config.model_dir)
    run = RunDir(config.run_dir)
    if (run.path / "sections").exists() and run.config_path.exists():
        # Saved sections are reused on a re-run: only if they were computed with the same settings
        # (which sections to run may differ).
        previous = {k: v for k, v in json.loads(run.config_path.read_text()).items() if k != "sections"}
        if previous != {k: v for k, v in config_to_dict(config).items() if k != "sections"}:
            raise SystemExit(f"{run.path} holds results of another configuration; use a new --run-dir")
    run.save_config(config)
    (run.path / "sections").mkdir(exist_ok=True)
    langs = config.langs
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    validation_texts = texts_by_lang(corpus["validation"], langs)
    validation = blocks_by_lang(tokenizer, validation_texts, config.n_ctx, config.blocks_per_lang)
    train_texts = corpus_texts_by_lang(config.corpus_dir, langs, "train", config.train_texts_per_lang, config.seed)
    train_blocks = blocks_by_lang(tokenizer, train_texts, config.n_ctx, 10 ** 9)
    parallel = parallel_sets(corpus, langs)
    parallel = {pid: parallel[pid] for pid in sorted(parallel)[: config.n_parallel]}
    sections, plots = {}, {}

    def section(name, compute):
        path = run.path / "sections" / f"{name}.json"
        if path.exists():
            sections[name] = json.loads(path.read_text())
            print(f"[{name}] reused {path}")
            return
        if name not in config.sections:
            return
        print(f"[{name}] computing…", flush=True)
        sections[name] = compute()
        atomic_write_json(path, sections[name])

    with torch.no_grad():
        def run_lens():
            table = language_table(token_counts(tokenizer, train_texts))
            blocks = torch.cat([validation[l] for l in langs])
            block_langs = [l for l in langs for _ in range(len(validation[l]))]
            probabilities, strings = lens.lens_language_probabilities(model, blocks, table, tokenizer)
            return lens.lens_report(probabilities, strings, block_langs, langs)
        section("lens", run_lens)

        def run_similarity():
            ids = sorted(parallel)
            states = {lang: similarity.pooled_states(model, tokenizer, [parallel[i][lang] for i in ids], config.n_ctx) for lang in langs}
            return similarity.similarity_report(states)
        section("similarity", run_similarity)

        def run_ablation():
            prompts = {lang: [t for t in validation_texts[lang]
                              if len(tokenizer(t, add_special_tokens=False)["input_ids"]) > config.prompt_tokens][: config.prompts_per_lang]
                       for lang in langs}
            known = config.known_lang if config.known_lang in langs else langs[0]
            return ablation.ablation_sweep(model, tokenizer, langs, validation, parallel, prompts, known,
                                           config.prompt_tokens, config.new_tokens, config.n_ctx)
        section("ablation", run_ablation)

        def run_lape():
            probabilities = lape.neuron_activation_probability(model, train_blocks)
            selections = {f"top{fraction:.0%}": lape.lape_select(probabilities, langs, fraction) for fraction in config.lape_fractions}
            first = selections[f"top{config.lape_fractions[0]:.0%}"]
            deactivation = lape.deactivation_matrix(model, first["by_lang"], validation, seed=config.seed)
            return {"selections": selections, "deactivation": deactivation}
        section("lape", run_lape)

        def run_features():
            probabilities = feature_activation_probability(model, clt, train_blocks)
            catalogue = language_features(probabilities, langs, config.max_entropy_bits, config.min_frequency, config.features_per_lang)
            chosen = [(f["layer"], f["feature"]) for items in catalogue.values() for f in items]
            all_validation = torch.cat([validation[l] for l in langs])
            contexts = top_contexts(model, clt, tokenizer, all_validation, chosen)
            promotes = promoted_tokens(model, clt, tokenizer, chosen)
            for items in catalogue.values():
                for f in items:
                    f["contexts"] = contexts[(f["layer"], f["feature"])]
                    f["promotes"] = promotes[(f["layer"], f["feature"])]
            h = lape.entropy(probabilities) / torch.log(torch.tensor(2.0))
            active = torch.isfinite(h)
            return {"n_layers": clt.config.n_layers, "langs": langs, "catalogue": catalogue,
                    "entropy_histogram_per_layer": [torch.histc(h[l][active[l]], bins=10, min=0, max=float(torch.log2(torch.tensor(len(langs))))).tolist()
                                                    for l in range(clt.config.n_layers)],
                    "mean_frequency_per_layer": probabilities.mean((1, 2)).tolist(),
                    "aligned_neurons": {lang: feature_aligned_neurons(model, clt, [(f["layer"], f["feature"]) for f in items])
                                        for lang, items in catalogue.items()}}
        if clt is not None:
            section("features", run_features)

        def run_probes():
            blocks = torch.cat([validation[l] for l in langs])
            block_langs = [l for l in langs for _ in range(len(validation[l]))]
            return probes.language_probes(model, blocks, block_langs, langs, clt=clt, seed=config.seed)
        section("probes", run_probes)

    if "lens" in sections:
        lens.plot_lens(sections["lens"], run.path / "lens.png")
        plots["Logit lens: language probability per layer"] = run.path / "lens.png"
    if "similarity" in sections:
        similarity.plot_similarity(sections["similarity"], run.path / "similarity.png")
        plots["Cross-lingual similarity per layer"] = run.path / "similarity.png"
    if "ablation" in sections:
        ablation.plot_ablation(sections["ablation"], run.path / "ablation.png")
        plots["Layer-ablation sweeps"] = run.path / "ablation.png"
    if "lape" in sections:
        first = next(iter(sections["lape"]["selections"].values()))
        lape.plot_lape(first, sections["lape"]["deactivation"], run.path / "lape.png")
        plots["LAPE language neurons"] = run.path / "lape.png"
    if "probes" in sections:
        _plot_probes(sections["probes"], run.path / "probes.png")
        plots["Linear probes of language"] = run.path / "probes.png"
    paths = write_report(run.path, sections, plots, f"Where is language decided? {config.model_dir}")
    located = _located(config, model, sections)
    save_located(run.path / "located.json", located)
    print(open(paths["markdown"]).read().split("\n## ")[0])
    print(f"report: {paths['html']}\nlocated units: {run.path / 'located.json'}")


def _located(config: LocateConfig, model, sections: dict) -> dict:
    langs = config.langs
    lape_section = sections.get("lape", {}).get("selections", {})
    names = list(lape_section)
    neurons = {l: [list(u) for u in lape_section[names[0]]["by_lang"][l]] for l in langs} if names else {}
    neurons5 = {l: [list(u) for u in lape_section[names[1]]["by_lang"][l]] for l in langs} if len(names) > 1 else {}
    features = {l: [[f["layer"], f["feature"]] for f in items] for l, items in sections.get("features", {}).get("catalogue", {}).items()}
    aligned = sections.get("features", {}).get("aligned_neurons", {})
    lens_section = sections.get("lens", {}).get("by_prompt_lang", {})
    return {"model_dir": config.model_dir, "model_sha256": model_fingerprint(config.model_dir), "clt_dir": config.clt or None,
            "langs": langs, "n_layers": model.config.n_layer,
            "layers": {"decision": {l: e["own_language_leads_from_layer"] for l, e in lens_section.items()},
                       "language_features": {l: layers_by_count(units) for l, units in features.items()},
                       "lape_neurons": {l: layers_by_count(units) for l, units in neurons.items()}},
            "neurons": neurons, "neurons_5pct": neurons5, "features": features, "feature_aligned_neurons": aligned}


def _plot_probes(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = report["probes"]
    residual = sorted((int(k.split("_")[1]), v["test_accuracy"]) for k, v in p.items() if k.startswith("residual_"))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([l for l, _ in residual], [a for _, a in residual], "-o", label="residual after layer")
    clt_rows = sorted((int(k.split("_")[1]), v["test_accuracy"]) for k, v in p.items() if k.startswith("clt_"))
    if clt_rows:
        ax.plot([l for l, _ in clt_rows], [a for _, a in clt_rows], "-s", label="CLT features of layer")
    ax.axhline(p["embedding"]["test_accuracy"], color="gray", linestyle=":", label="token embedding")
    ax.axhline(p["residual_0"]["majority_baseline"], color="black", linestyle="--", label="majority class")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
