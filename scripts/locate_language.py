"""Where is language decided? Lenses, similarity, ablation sweeps, LAPE neurons, CLT language features,
probes.

    python scripts/locate_language.py                                  # default tiny en-heavy model + its CLT
    python scripts/locate_language.py --model-dir runs/tiny-balanced/model --clt "" --run-dir
    runs/locate-balanced
    python scripts/locate_language.py --sections lens,similarity       # only some sections

Writes into --run-dir: config.json, sections/<name>.json (each section is saved when done and reused
on a re-run, so a killed run resumes), plots, report.{json,md,html} and located.json — the language
neurons / features / layers that steering and fine-tuning read (analysis/located.py). The logic is
`analysis.locate.locate_language`.
"""

from analysis.locate import LocateConfig, locate_language
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    result = locate_language(parse_config(LocateConfig, argv))
    print(open(result["report"]["markdown"]).read().split("\n## ")[0])
    print(f"report: {result['report']['html']}\nlocated units: {result['located']}")


if __name__ == "__main__":
    run_main(main)
