"""Cross-lingual overlap of attribution graphs (the multilingual-CLT paper's "shared multilingual features").

For the same paragraph in several languages (the corpus's held-out parallel split), build each
language's pruned graph and compare, layer by layer, the sets of CLT features it keeps (a feature is
(layer, index), at any position):

    Jaccard(A, B) = |A ∩ B| / |A ∪ B|        seed's ratio(A, B) = |A ∩ B| / max(|A|, |B|)

The null baseline pairs language A's graph for paragraph i with language B's graph for a *different*
paragraph j (a fixed derangement): overlap that comes from features every prompt uses (frequent,
position-like or BOS-adjacent features) rather than from shared meaning. Parallel minus null is the
evidence for language-independent features.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from attribution.pipeline import build_graph, prompt_tokens
from attribution.query import features_by_layer, to_networkx
from training import paths
from training.config import RunDir, atomic_write_json, atomic_write_text
from training.corpus.build import default_corpus_dir, load_corpus, parallel_sets
from training.errors import UserError


def set_overlap(a: set, b: set) -> tuple[float, float] | None:
    """(Jaccard, |A∩B|/max(|A|,|B|)), or None when both sets are empty: with nothing kept in either
    graph at that layer, overlap is undefined and such pairs are left out of the means (and counted)."""
    if not a and not b:
        return None
    shared = len(a & b)
    return shared / len(a | b), shared / max(len(a), len(b))


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (i → j ≠ i), n ≥ 2."""
    if n < 2:
        raise ValueError("a shuffled-pair null needs at least two prompts")
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def overlap_by_layer(features: dict[str, list[dict[int, set[int]]]], n_layers: int, seed: int = 0) -> dict:
    """`features[lang][i]` = the pruned graph's {layer: feature set} for parallel paragraph i (same i = same
    paragraph across languages). Returns per-layer means for parallel pairs and for the shuffled null,
    overall and per language pair, with per-layer standard errors over paragraphs."""
    langs = sorted(features)
    n = len(features[langs[0]])
    if any(len(features[lang]) != n for lang in langs):
        raise ValueError("every language needs a graph for every paragraph")
    shuffle = derangement(n, seed)
    result = {"langs": langs, "n_paragraphs": n, "n_layers": n_layers, "pairs": {}}
    totals = {
        key: [[] for _ in range(n_layers)] for key in ("jaccard", "ratio", "null_jaccard", "null_ratio")
    }
    for a, b in itertools.combinations(langs, 2):
        pair = {key: [[] for _ in range(n_layers)] for key in totals}
        for i in range(n):
            for layer in range(n_layers):
                fa = features[a][i].get(layer, set())
                for prefix, fb in (
                    ("", features[b][i].get(layer, set())),
                    ("null_", features[b][shuffle[i]].get(layer, set())),
                ):
                    overlap = set_overlap(fa, fb)
                    if overlap is None:
                        continue
                    for key, value in zip(("jaccard", "ratio"), overlap):
                        pair[prefix + key][layer].append(value)
                        totals[prefix + key][layer].append(value)
        result["pairs"][f"{a}-{b}"] = {key: [_mean(v) for v in values] for key, values in pair.items()}
    result["all"] = {key: [_mean(v) for v in values] for key, values in totals.items()}
    result["all_sem"] = {
        key: [float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan") for v in values]
        for key, values in totals.items()
    }
    result["n_defined_pairs"] = {key: [len(v) for v in values] for key, values in totals.items()}
    return result


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def plot_overlap(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(result["n_layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (key, name) in zip(
        axes, (("jaccard", "Jaccard |A∩B|/|A∪B|"), ("ratio", "seed ratio |A∩B|/max(|A|,|B|)"))
    ):
        for suffix, style, label in (
            ("", "-o", "parallel (same paragraph)"),
            ("null_", "--s", "shuffled pairs (null)"),
        ):
            mean = np.array(result["all"][suffix + key])
            sem = np.array(result["all_sem"][suffix + key])
            ax.errorbar(layers, mean, yerr=sem, fmt=style, capsize=3, label=label)
        ax.set_xlabel("layer")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("overlap of pruned-graph features")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Cross-lingual feature overlap, {result['n_paragraphs']} paragraphs × {len(result['langs'])} "
        "languages "
        f"({', '.join(result['langs'])})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def overlap_markdown(result: dict) -> str:
    lines = [
        "| layer | Jaccard parallel | Jaccard null | ratio parallel | ratio null "
        "| pairs with features (parallel / null) |",
        "|---|---|---|---|---|---|",
    ]
    a, n = result["all"], result["n_defined_pairs"]
    for layer in range(result["n_layers"]):
        lines.append(
            f"| {layer} | {a['jaccard'][layer]:.3f} | {a['null_jaccard'][layer]:.3f} | "
            f"{a['ratio'][layer]:.3f} | {a['null_ratio'][layer]:.3f} | {n['jaccard'][layer]} / "
            f"{n['null_jaccard'][layer]} |"
        )
    lines += ["", "Per language pair (Jaccard parallel − null, per layer):", ""]
    for pair, values in result["pairs"].items():
        gaps = ", ".join(f"{p - q:+.3f}" for p, q in zip(values["jaccard"], values["null_jaccard"]))
        lines.append(f"- {pair}: {gaps}")
    return "\n".join(lines) + "\n"


@dataclass
class OverlapConfig:
    """Cross-lingual overlap of pruned attribution graphs."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    clt: str = field(default=paths.CLT_DIR, metadata={"help": "transcoder directory (native format)"})
    corpus_dir: str | None = field(
        default=None, metadata={"help": "corpus with a parallel split (default: the built corpus)"}
    )
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"], metadata={"help": "languages"}
    )
    n_paragraphs: int = field(default=20, metadata={"help": "parallel paragraphs"})
    min_tokens: int = field(
        default=8, metadata={"help": "paragraphs at least this long (tokens) in every language"}
    )
    max_tokens: int = field(default=48, metadata={"help": "...and at most this long, BOS included"})
    node_threshold: float = field(default=0.8, metadata={"help": "pruning node threshold"})
    edge_threshold: float = field(default=0.98, metadata={"help": "pruning edge threshold"})
    seed: int = field(default=0, metadata={"help": "paragraph selection and null shuffling"})
    run_dir: str = field(default="runs/cross-lingual-overlap", metadata={"help": "output run directory"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def choose_paragraphs(sets: dict[str, dict[str, str]], tokenizer, config: OverlapConfig) -> list[str]:
    fitting = [
        pid
        for pid, texts in sets.items()
        if all(
            config.min_tokens <= len(prompt_tokens(tokenizer, texts[lang])) <= config.max_tokens
            for lang in config.langs
        )
    ]
    if len(fitting) < max(2, config.n_paragraphs):
        raise UserError(
            f"only {len(fitting)} parallel paragraphs are {config.min_tokens}–{config.max_tokens} tokens in "
            "all of "
            f"{config.langs}; lower --n-paragraphs or widen the token range"
        )
    return sorted(random.Random(config.seed).sample(fitting, config.n_paragraphs))


def run_overlap(config: OverlapConfig) -> dict:
    """Build (or reuse) each paragraph's graph per language and measure the per-layer overlap."""
    from clt.export import load_model_and_clt

    run = RunDir.open(config.run_dir, config)
    model, tokenizer, clt = load_model_and_clt(config.model_dir, config.clt, config.device)
    sets = parallel_sets(load_corpus(config.corpus_dir or default_corpus_dir()), config.langs)
    paragraph_ids = choose_paragraphs(sets, tokenizer, config)
    done = run.keyed(("parallel_id", "lang"))
    jobs = [(pid, lang) for pid in paragraph_ids for lang in config.langs if (pid, lang) not in done]
    for pid, lang in tqdm(jobs, desc="graphs", unit="graph"):
        graph, pruned = build_graph(
            model,
            tokenizer,
            clt,
            sets[pid][lang],
            lang=lang,
            node_threshold=config.node_threshold,
            edge_threshold=config.edge_threshold,
        )
        layers = features_by_layer(to_networkx(graph, pruned))
        record = {
            "parallel_id": pid,
            "lang": lang,
            "n_tokens": graph.n_pos,
            "n_active_features": graph.n_features,
            "features": {str(layer): sorted(feats) for layer, feats in layers.items()},
            **graph.metadata["scores"],
        }
        run.log_metrics(record)
        done[(pid, lang)] = record
    features = {
        lang: [
            {int(layer): set(feats) for layer, feats in done[(pid, lang)]["features"].items()}
            for pid in paragraph_ids
        ]
        for lang in config.langs
    }
    result = overlap_by_layer(features, clt.config.n_layers, seed=config.seed)
    result["paragraph_ids"] = paragraph_ids
    result["mean_kept_features_per_layer"] = [
        sum(len(f.get(layer, ())) for lang in config.langs for f in features[lang])
        / (len(config.langs) * len(paragraph_ids))
        for layer in range(clt.config.n_layers)
    ]
    atomic_write_json(run.path / "overlap.json", result)
    plot_overlap(result, run.path / "overlap.png")
    atomic_write_text(run.path / "overlap.md", overlap_markdown(result))
    return result
