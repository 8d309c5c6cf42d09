"""Diff two models through one CLT: HTML (plots inline), Markdown and JSON report.

    python scripts/model_diff.py --before runs/pretrain-tiny-en-heavy/model \
        --after runs/finetune/adapt-eu-full-0/model --clt runs/clt-tiny-en-heavy/clt --run-dir runs/model-diff

Per layer and language: CLT feature frequency and strength on both models and the CLT's FVU on each
(it drifts off a model it was not trained on), brightening/dimming of language-identity features,
attribution-graph edge changes and middle-layer cross-lingual cluster strength on the same prompts,
tokenizer fertility vs layer-0 features, logit-lens KL per layer. `--help` lists every option.
"""

from analysis.model_diff_report import ModelDiffConfig, run_model_diff
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    config = parse_config(ModelDiffConfig, argv)
    result = run_model_diff(config)
    for finding in result["findings"]:
        print(f"- {finding['claim']}: {finding['verdict']} ({finding['measure']})")
    print(f"report: {config.run_dir}/report.html ({result['time_s']:.0f} s)")


if __name__ == "__main__":
    run_main(main)
