"""Export a trained transcoder for circuit-tracer or sae-lens.

    python scripts/export_clt.py --clt runs/clt-tiny-en-heavy/clt --format circuit-tracer --run-dir runs/ct

The export lands in `<run-dir>/circuit_tracer` (or `<run-dir>/sae_lens`). The logic is `clt.export.export`.
"""

from clt.export import ExportConfig, export
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    for path in export(parse_config(ExportConfig, argv)):
        print(path)


if __name__ == "__main__":
    run_main(main)
