"""Export a trained transcoder for circuit-tracer or sae-lens.

python scripts/export_clt.py --clt runs/clt-tiny-en-heavy/clt --format circuit-tracer --out runs/ct
"""

from dataclasses import dataclass, field

from clt.export import export_circuit_tracer, export_sae_lens, load_native
from training import paths
from training.config import parse_config


@dataclass
class ExportConfig:
    """Export a transcoder saved by train_clt.py."""

    clt: str = field(default=paths.CLT_DIR, metadata={"help": "transcoder directory (native format)"})
    format: str = field(default="circuit-tracer", metadata={"help": "circuit-tracer or sae-lens"})
    out: str = field(default="runs/clt-export", metadata={"help": "output directory"})


def main(argv=None) -> None:
    config = parse_config(ExportConfig, argv)
    clt, _ = load_native(config.clt)
    if config.format == "circuit-tracer":
        print(export_circuit_tracer(clt, config.out))
    elif config.format == "sae-lens":
        for path in export_sae_lens(clt, config.out):
            print(path)
    else:
        raise SystemExit(f"unknown format {config.format!r}: circuit-tracer or sae-lens")


if __name__ == "__main__":
    main()
