"""Per-layer overlap of attribution-graph features across translations of the same paragraph.

    python scripts/cross_lingual_overlap.py --model-dir runs/pretrain-tiny-en-heavy/model \
        --clt runs/clt-tiny-en-heavy/clt --langs en,fr,de,es,ru,zh --n-paragraphs 20

Picks held-out parallel paragraphs (seeded) that fit in --max-tokens in every language, builds and
prunes each language's graph (salient next-token logits as targets), and compares the kept features
per layer: Jaccard and |A∩B|/max, parallel pairs vs a shuffled-pair null (attribution/overlap.py).
Writes metrics.jsonl (one line per graph; a re-run resumes from it), overlap.json, overlap.png and
overlap.md into --run-dir. The logic is `attribution.overlap.run_overlap`.
"""

from attribution.overlap import OverlapConfig, overlap_markdown, run_overlap
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    config = parse_config(OverlapConfig, argv)
    print(overlap_markdown(run_overlap(config)))
    print(f"written to {config.run_dir}/overlap.{{json,png,md}}")


if __name__ == "__main__":
    run_main(main)
