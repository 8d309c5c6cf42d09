"""Re-measure the study's claims end to end and write the results report (analysis/reproduce.py).

    python scripts/reproduce.py --scale tiny    # docs/RESULTS-tiny.md, docs/results-tiny.html, .json
    python scripts/reproduce.py --scale base    # docs/RESULTS.md, with the base models of runs/base

Finished stages are reused (each is a resumable run directory); a changed setting is refused.
"""

from analysis.reproduce import ReproduceConfig, report_name, reproduce
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    config = parse_config(ReproduceConfig, argv)
    results = reproduce(config)
    if "claims" not in results:  # (a subset of the stages: no report yet)
        return
    for claim in results["claims"]:
        print(f"({claim['key']}) {claim['verdict']:>15}: {claim['claim']}")
    print(f"report: {config.report_dir}/{report_name(config.scale)}.md")


if __name__ == "__main__":
    run_main(main)
