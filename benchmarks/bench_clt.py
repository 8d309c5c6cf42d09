"""CLT throughput: training tokens/s with dense vs sparse decoding, and activation collection vs the
model's forward pass alone.

    python benchmarks/bench_clt.py --model-dir runs/tiny-en-heavy/model --steps 60

Both decoders train the same transcoder from the same initial weights on the same batches; the sparse
one gathers only the active features' decoder rows. Collection writes a fresh Zarr store of `--tokens`
tokens and is compared with a bare forward pass over exactly the same blocks.
Prints a JSON record; docs/clt.md holds the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from clt.activations import CollectConfig, collect_activations, collection_blocks, forward_only_throughput
from clt.train import CLTTrainConfig, train_clt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--corpus-dir", default=None)
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens to collect")
    parser.add_argument("--steps", type=int, default=60, help="CLT training steps per decoder")
    parser.add_argument("--n-features", type=int, default=512)
    parser.add_argument(
        "--activations",
        default="topk,jumprelu",
        help="sparse decoding is exact for topk, approximate for jumprelu (see clt/model.py)",
    )
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
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

        for activation in args.activations.split(","):
            for sparse in ("false", "true"):
                config = CLTTrainConfig(
                    run_dir=str(Path(tmp) / f"clt-{activation}-{sparse}"),
                    model_dir=args.model_dir,
                    store=store.url,
                    corpus_dir=args.corpus_dir,
                    n_features=args.n_features,
                    activation=activation,
                    k=args.k,
                    max_steps=args.steps,
                    sparse_decode=sparse,
                    eval_blocks=2,
                    log_every=10,
                    ckpt_every=10**9,
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
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
