"""LinguaMap's four-scenario protocol on a task our models can do: the UI-term cloze of the held-out
parallel help text (analysis/linguamap.py).

    python scripts/linguamap.py                                   # the default tiny en-heavy model
    python scripts/linguamap.py --model-dir models/base-balanced --run-dir runs/linguamap-base-balanced
    python scripts/linguamap.py --langs en,fr,de,es,ru,zh,eu --shots 0,3 --modes likelihood
    python scripts/linguamap.py --finetune-data runs/linguamap-data   # for finetune.py --scenario linguamap

Per scenario (demonstration language × query language → expected answer language), language and number
of demonstrations: the shares of correct / right answer in another language (consistency bottleneck) /
wrong answer in the expected language (transfer bottleneck) / other, by greedy generation and by
likelihood ranking. Resumable run directory; report.{json,md,html} and outcomes.png.
"""

from analysis.linguamap_run import LinguaMapConfig, prepare_finetune_data, run_linguamap
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    config = parse_config(LinguaMapConfig, argv)
    if config.finetune_data:
        print(prepare_finetune_data(config))
        return
    result = run_linguamap(config)
    print(f"{len(result['cells'])} cells; report in {config.run_dir}/report.md")


if __name__ == "__main__":
    run_main(main)
