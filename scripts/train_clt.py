"""The front door: train a cross-layer transcoder and report how good it is.

With no arguments it runs the embedded default end to end: builds the default corpus and pretrains the
tiny English-heavy model if they do not exist yet (cached for next time), collects activations into a
Zarr store, trains a JumpReLU CLT, evaluates it (per-layer FVU, L0, dead features, replacement-model KL
per language) and exports it for circuit-tracer. Any model directory, store or setting can be given;
`--help` lists them all. `torchrun --nproc-per-node N scripts/train_clt.py ...` trains data-parallel.
"""

import json
from pathlib import Path

from clt.export import NotExportable, export_circuit_tracer, load_native
from clt.train import CLTTrainConfig, format_summary, train_clt
from training.config import parse_config, run_main
from training.errors import UserError
from training.pretrain import PretrainConfig, pretrain


def main(argv: list[str]) -> None:
    config = parse_config(CLTTrainConfig, argv)
    model_dir = Path(config.model_dir)
    default_model = Path(PretrainConfig().run_dir) / "model"
    if not (model_dir / "model.safetensors").exists():
        if model_dir != default_model:
            raise UserError(
                f"no model at {model_dir} (expected a save_pretrained directory with model.safetensors)"
            )
        print(
            f"{model_dir} does not exist yet: pretraining the default tiny model first (cached for next time)"
        )
        pretrain(PretrainConfig())
    report = train_clt(config)
    if not report:
        return  # a non-zero torchrun rank
    clt, _ = load_native(Path(config.run_dir) / "clt")
    try:
        export_circuit_tracer(clt, Path(config.run_dir) / "circuit_tracer")
    except NotExportable as reason:
        print(f"circuit-tracer export skipped: {reason}")
    print(format_summary(report))
    print(json.dumps({k: report[k] for k in ("run_dir", "steps", "tokens", "train_tokens_per_s")}, indent=1))


if __name__ == "__main__":
    run_main(main)
