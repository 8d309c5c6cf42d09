"""CLT throughput: training tokens/s with dense vs sparse decoding, and activation collection vs the
model's forward pass alone.

    python benchmarks/bench_clt.py --model-dir runs/pretrain-tiny-en-heavy/model --steps 60 --run-dir
    runs/bench-clt

Both decoders train the same transcoder from the same initial weights on the same batches; the sparse
one gathers only the active features' decoder rows. Collection writes a fresh Zarr store of `--tokens`
tokens and is compared with a bare forward pass over exactly the same blocks.
Prints a JSON record and writes it to <run-dir>/results.json; docs/clt.md holds the measured numbers.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clt.activations import CollectConfig, collect_activations, collection_blocks
from clt.train import CLTTrainConfig, train_clt
from training import paths
from training.config import RunDir, atomic_write_json, config_from_dict, parse_config, run_main


@dataclass
class BenchCLTConfig:
    """CLT training throughput (dense vs sparse decoding) and collection vs the bare forward."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    tokens: int = field(default=200_000, metadata={"help": "tokens to collect"})
    steps: int = field(default=60, metadata={"help": "CLT training steps per decoder"})
    n_features: int = field(default=512, metadata={"help": "features per layer"})
    activations: list[str] = field(
        default_factory=lambda: ["topk", "jumprelu"],
        metadata={"help": "sparse decoding is exact for topk, approximate for jumprelu"},
    )
    k: int = field(default=16, metadata={"help": "k for topk"})
    run_dir: str = field(default="runs/bench-clt", metadata={"help": "run directory (results.json)"})


def forward_only_throughput(
    model_dir: str, blocks: torch.Tensor, batch_size: int, with_head: bool = False
) -> float:
    """Stored tokens/s of the bare forward pass over `blocks`: the baseline for collection overhead.
    Without the head it is the same computation collection needs (transformer body, no hooks, no writes)."""
    from training.models import load_model

    model, _ = load_model(model_dir)
    forward = model if with_head else model.transformer
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            forward(input_ids=blocks[i : i + batch_size].long())
    return blocks[:, 1:].numel() / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    args = parse_config(BenchCLTConfig, argv)
    run = RunDir.open(args.run_dir, args, may_change=())
    result: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        collect = CollectConfig(
            model_dir=args.model_dir,
            store=str(Path(tmp) / "bench.zarr"),
            corpus_dir=args.corpus_dir,
            n_tokens=args.tokens,
        )
        store = collect_activations(collect)
        loop = store.attrs["last_collection_rank0"]

        from transformers import AutoTokenizer

        from training.corpus.build import default_corpus_dir, load_corpus
        from training.mixtures import parse_mixture

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        train = load_corpus(args.corpus_dir or default_corpus_dir())["train"]
        blocks, _ = collection_blocks(
            tokenizer,
            list(train["text"]),
            list(train["lang"]),
            parse_mixture(collect.mixture),
            collect.n_tokens,
            collect.n_ctx,
            collect.seed,
        )
        blocks = blocks[: store.n_shards * collect.blocks_per_shard]
        forward_tps = forward_only_throughput(args.model_dir, blocks, collect.batch_size)
        forward_with_head_tps = forward_only_throughput(
            args.model_dir, blocks, collect.batch_size, with_head=True
        )
        collect_tps = loop["tokens"] / loop["seconds"]
        result["collection"] = {
            "tokens": loop["tokens"],
            "tokens_per_s": collect_tps,
            "forward_only_tokens_per_s": forward_tps,
            "forward_with_lm_head_tokens_per_s": forward_with_head_tps,
            "zarr_overhead": forward_tps / collect_tps - 1,
        }

        for activation in args.activations:
            for sparse in ("false", "true"):
                config = config_from_dict(
                    CLTTrainConfig,
                    {
                        "run_dir": str(Path(tmp) / f"clt-{activation}-{sparse}"),
                        "model_dir": args.model_dir,
                        "store": store.url,
                        "corpus_dir": args.corpus_dir,
                        "n_features": args.n_features,
                        "activation": activation,
                        "k": args.k,
                        "max_steps": args.steps,
                        "sparse_decode": sparse,
                        "eval_blocks": 2,
                        "log_every": 10,
                        "ckpt_every": 10**9,
                    },
                )
                report = train_clt(config)
                result[f"{activation}_sparse_{sparse}"] = {
                    "tokens_per_s": report["train_tokens_per_s"],
                    "heldout_mean_l0": report["heldout"]["all"]["mean_l0"],
                    "heldout_mean_fvu": report["heldout"]["all"]["mean_fvu"],
                }
            result[f"{activation}_sparse_speedup"] = (
                result[f"{activation}_sparse_true"]["tokens_per_s"]
                / result[f"{activation}_sparse_false"]["tokens_per_s"]
            )
    atomic_write_json(run.path / "results.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
