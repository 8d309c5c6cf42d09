"""Attribution graphs of the CLT replacement model for one prompt or a file of prompts.

    python scripts/attribute.py --model-dir runs/pretrain-tiny-en-heavy/model --clt
    runs/clt-tiny-en-heavy/clt \
        --prompt "Click OK to close the"
    python scripts/attribute.py --model-dir ... --clt ... --prompts prompts.jsonl   # {"text": ..., "lang":
    ...} per line
    python scripts/attribute.py ... --prompt "Le rapport est prêt" --target lang:fr \
        --translations '{"en": "Friday", "fr": "vendredi", "de": "Freitag"}'

Writes into --run-dir: config.json, metrics.jsonl (one record per prompt: features, nodes/edges kept,
scores, timings) and graphs/<slug>/ with the saved graph (safetensors + JSON), circuit-tracer graph
JSON (serve with `python -m circuit_tracer.frontend.local_server` pointed at graphs/<slug>/circuit_tracer),
GraphML, a self-contained HTML view and a PNG. Re-running skips prompts already done. The logic is
`attribution.run.run_attribution`.
"""

from attribution.run import AttributeConfig, run_attribution
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    run_attribution(parse_config(AttributeConfig, argv))


if __name__ == "__main__":
    run_main(main)
