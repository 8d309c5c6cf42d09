"""Per-layer overlap of attribution-graph features across translations of the same paragraph.

    python scripts/cross_lingual_overlap.py --model runs/tiny-en-heavy/model --clt runs/clt-tiny-en-heavy/clt \
        --langs en,fr,de,es,ru,zh --n-paragraphs 20

Picks held-out parallel paragraphs (seeded) that fit in --max-tokens in every language, builds and
prunes each language's graph (salient next-token logits as targets), and compares the kept features
per layer: Jaccard and |A∩B|/max, parallel pairs vs a shuffled-pair null (attribution/overlap.py).
Writes features.jsonl (one line per graph; a re-run resumes from it), overlap.json, overlap.png and
overlap.md into --run-dir.
"""

import random
from dataclasses import dataclass, field

from tqdm import tqdm

from attribution.overlap import overlap_by_layer, overlap_markdown, plot_overlap
from attribution.pipeline import build_graph, load_model_and_clt, prompt_tokens
from attribution.query import features_by_layer, to_networkx
from training.config import RunDir, atomic_write_json, atomic_write_text, parse_config
from training.corpus.build import default_corpus_dir, load_corpus, parallel_sets


@dataclass
class OverlapConfig:
    """Cross-lingual overlap of pruned attribution graphs."""

    model: str = field(default="runs/pretrain-tiny-en-heavy/model", metadata={"help": "HF model directory"})
    clt: str = field(default="runs/clt-tiny-en-heavy/clt", metadata={"help": "transcoder directory (native format)"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus with a parallel split (default: the built corpus)"})
    langs: list[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"], metadata={"help": "languages"})
    n_paragraphs: int = field(default=20, metadata={"help": "parallel paragraphs"})
    min_tokens: int = field(default=8, metadata={"help": "paragraphs at least this long (tokens) in every language"})
    max_tokens: int = field(default=48, metadata={"help": "...and at most this long, BOS included"})
    node_threshold: float = field(default=0.8, metadata={"help": "pruning node threshold"})
    edge_threshold: float = field(default=0.98, metadata={"help": "pruning edge threshold"})
    seed: int = field(default=0, metadata={"help": "paragraph selection and null shuffling"})
    run_dir: str = field(default="runs/cross-lingual-overlap", metadata={"help": "output run directory"})


def choose_paragraphs(sets: dict[str, dict[str, str]], tokenizer, config: OverlapConfig) -> list[str]:
    fitting = [pid for pid, texts in sets.items()
               if all(config.min_tokens <= len(prompt_tokens(tokenizer, texts[lang])) <= config.max_tokens for lang in config.langs)]
    if len(fitting) < max(2, config.n_paragraphs):
        raise SystemExit(f"only {len(fitting)} parallel paragraphs are {config.min_tokens}–{config.max_tokens} tokens in all of "
                         f"{config.langs}; lower --n-paragraphs or widen the token range")
    return sorted(random.Random(config.seed).sample(fitting, config.n_paragraphs))


def main(argv=None) -> None:
    config = parse_config(OverlapConfig, argv)
    model, tokenizer, clt = load_model_and_clt(config.model, config.clt)
    sets = parallel_sets(load_corpus(config.corpus_dir or default_corpus_dir()), config.langs)
    paragraph_ids = choose_paragraphs(sets, tokenizer, config)
    run = RunDir(config.run_dir)
    run.save_config(config)
    done = {(r["parallel_id"], r["lang"]): r for r in run.read_metrics()}
    jobs = [(pid, lang) for pid in paragraph_ids for lang in config.langs if (pid, lang) not in done]
    for pid, lang in tqdm(jobs, desc="graphs", unit="graph"):
        graph, pruned = build_graph(model, tokenizer, clt, sets[pid][lang], lang=lang,
                                    node_threshold=config.node_threshold, edge_threshold=config.edge_threshold)
        layers = features_by_layer(to_networkx(graph, pruned))
        record = {"parallel_id": pid, "lang": lang, "n_tokens": graph.n_pos, "n_active_features": graph.n_features,
                  "features": {str(layer): sorted(feats) for layer, feats in layers.items()}, **graph.metadata["scores"]}
        run.log_metrics(record)
        done[(pid, lang)] = record
    features = {lang: [{int(layer): set(feats) for layer, feats in done[(pid, lang)]["features"].items()}
                       for pid in paragraph_ids] for lang in config.langs}
    result = overlap_by_layer(features, clt.config.n_layers, seed=config.seed)
    result["paragraph_ids"] = paragraph_ids
    result["mean_kept_features_per_layer"] = [
        sum(len(f.get(layer, ())) for lang in config.langs for f in features[lang]) / (len(config.langs) * len(paragraph_ids))
        for layer in range(clt.config.n_layers)]
    atomic_write_json(run.path / "overlap.json", result)
    plot_overlap(result, run.path / "overlap.png")
    atomic_write_text(run.path / "overlap.md", overlap_markdown(result))
    print(overlap_markdown(result))
    print(f"written to {run.path}/overlap.{{json,png,md}}")


if __name__ == "__main__":
    main()
