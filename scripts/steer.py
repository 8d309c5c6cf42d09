"""Steer the output language with CLT features, against controls, over many held-out prompts.

    python scripts/steer.py --from fr --to de                         # default model, CLT and located units
    python scripts/steer.py --pairs all --langs en,fr,de,es,ru,zh     # every ordered pair
    python scripts/steer.py --from fr --to de --methods clt,diffmean --strengths 0,1,4

Language features and LAPE neurons come from `located.json` (scripts/locate_language.py), or are
located on the spot with the same rules when that file does not exist. Each
(pair, method, strength) is evaluated on --n-prompts held-out parallel-split prompts in the source
language (greedy continuations judged by CLD2; interventions/steering.py) and appended to
metrics.jsonl, so a killed run resumes. Also writes summary.json, summary.md (pairs × methods at each
method's best strength, with 95% intervals) and dose_response.png. The logic is
`interventions.sweep.run_steering`.
"""

from interventions.sweep import SteerConfig, run_steering, summary_markdown
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    argv = [{"--from": "--source", "--to": "--target"}.get(a, a) for a in argv]
    summary = run_steering(parse_config(SteerConfig, argv))
    print(summary_markdown(summary))


if __name__ == "__main__":
    run_main(main)
