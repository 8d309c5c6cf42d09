"""Pretraining throughput: the project's training loop vs a bare PyTorch loop on the same model and batches.

    python benchmarks/bench_pretrain.py --tokenizer-dir runs/pretrain-tiny-en-heavy/model --steps 100

Both loops start from the same initial weights, read the same blocks in the same order, and use the same
AdamW parameter groups. The project loop adds what a real run needs (lr schedule, gradient clipping,
logging, tqdm, periodic checkpoints); evaluation and the final generation are excluded from its time.
Prints a JSON record and writes it to <run-dir>/results.json; docs/pretraining.md holds the measured numbers.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from training import paths
from training.config import RunDir, atomic_write_json, parse_config, run_main
from training.models import PRESETS
from training.pretrain import PretrainConfig, model_config_for, pretrain, time_bare_steps


@dataclass
class BenchPretrainConfig:
    """Pretraining throughput: the project's loop vs a bare PyTorch loop."""

    tokenizer_dir: str = field(
        default=paths.MODEL_DIR, metadata={"help": "a saved tokenizer (e.g. a run's model dir)"}
    )
    mixture: str = field(default="en-heavy", metadata={"help": "language mixture"})
    steps: int = field(default=100, metadata={"help": "optimizer steps per loop"})
    repeats: int = field(default=2, metadata={"help": "alternate the two loops this many times"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    run_dir: str = field(default="runs/bench-pretrain", metadata={"help": "run directory (results.json)"})


def main(argv: list[str]) -> None:
    args = parse_config(BenchPretrainConfig, argv)
    run = RunDir.open(args.run_dir, args, may_change=())
    torch.set_num_threads(torch.get_num_threads())

    results = {"project_s": [], "bare_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            run_dir = Path(tmp) / f"run{repeat}"
            config = PretrainConfig(
                run_dir=str(run_dir),
                mixture=args.mixture,
                tokenizer_dir=args.tokenizer_dir,
                max_steps=args.steps,
                eval_every=10**9,
                ckpt_every=50,
                gen_prompts=1,
                gen_new_tokens=1,
                bf16=args.bf16,
            )
            summary = pretrain(config)
            results["project_s"].append(summary["train_time_s"])
            blocks = load_file(str(run_dir / "data" / "blocks.safetensors"))["train"]
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                model_config = model_config_for(
                    config, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
                )
                results["bare_s"].append(time_bare_steps(model_config, blocks, config, args.steps))
    tokens = args.steps * config.micro_batch * PRESETS[config.preset].n_ctx
    project, bare = min(results["project_s"]), min(results["bare_s"])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "preset": config.preset,
        "micro_batch": config.micro_batch,
        "steps": args.steps,
        "bf16": args.bf16,
        "project_tokens_per_s": tokens / project,
        "bare_tokens_per_s": tokens / bare,
        "slowdown_project_vs_bare": project / bare,
        "raw_seconds": results,
    }
    atomic_write_json(run.path / "results.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
