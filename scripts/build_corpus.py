"""Build the offline multilingual corpus (DatasetDict on disk). `--help` lists every option."""

from training.config import parse_config, run_main
from training.corpus.build import CorpusConfig, build_corpus, corpus_summary_markdown, load_corpus_stats


def main(argv: list[str]) -> None:
    config = parse_config(CorpusConfig, argv)
    build_corpus(config)
    print(corpus_summary_markdown(load_corpus_stats(config.corpus_dir)))
    print(f"corpus saved in {config.corpus_dir}")


if __name__ == "__main__":
    run_main(main)
