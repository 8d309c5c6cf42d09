"""Steer the output language with CLT features, against controls, over many held-out prompts.

    python scripts/steer.py --from fr --to de                         # default model, CLT and located units
    python scripts/steer.py --pairs all --langs en,fr,de,es,ru,zh     # every ordered pair
    python scripts/steer.py --recipe seed003 --methods output,random-output,diffmean
    python scripts/steer.py --prompt "Le rapport de vendredi" --to de  # one prompt, every method side by side
    python scripts/steer.py --prompts my_prompts.jsonl --to de        # {"text": ..., "lang": ...} per line

Feature sets (entropy, output, attribution, aligned) and LAPE neurons come from `located.json`
(scripts/locate_language.py), or are located on the spot with the same rules when that file does not
exist. Each (pair, method, strength, decoding) is evaluated on --n-prompts held-out parallel-split
prompts in the source language (judged by CLD2; interventions/steering.py) and appended to
metrics.jsonl, so a killed run resumes. Methods are compared on a fluency-matched frontier: success at
Δ loss ≤ 0.5 and ≤ 1.0 nats/token (summary.json, summary.md, frontier.png). The logic is
`interventions.sweep`.
"""

from interventions.sweep import SteerConfig, run_steering, steer_prompt, summary_markdown
from training import langid
from training.config import parse_config, run_main
from training.errors import UserError


def main(argv: list[str]) -> None:
    argv = [{"--from": "--source", "--to": "--target"}.get(a, a) for a in argv]
    config = parse_config(SteerConfig, argv)
    if config.prompt:
        if "--source" not in argv:  # the prompt's language, unless the user says it
            detected = langid.detect(config.prompt)
            if detected == langid.UNKNOWN:
                raise UserError("could not tell the prompt's language: pass --from LANG")
            config.source = detected
        if config.source == config.target:
            raise UserError(f"the prompt is already in {config.target}: choose another --to")
        print(f"prompt ({config.source} → {config.target}): {config.prompt}\n")
        for row in steer_prompt(config):
            label = f"{row['method']} @{row['strength']:g}" if row["method"] != "none" else "unsteered"
            text = row.get("error") or f"[{row['detected']}] {row['continuation']}"
            print(f"{label:>24}  {text}")
        return
    summary = run_steering(config)
    print(summary_markdown(summary, config.budgets))


if __name__ == "__main__":
    run_main(main)
