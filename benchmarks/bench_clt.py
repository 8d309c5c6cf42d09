"""CLT throughput: training tokens/s with dense vs sparse decoding and with the loss compiled
(`--compile`), as a fraction of this machine's measured matmul peak; activation collection vs the
model's forward pass alone; two torchrun writers vs one.

    python benchmarks/bench_clt.py --model-dir runs/pretrain-tiny-en-heavy/model --steps 60 --run-dir
    runs/bench-clt

Both decoders train the same transcoder from the same initial weights on the same batches; the sparse
one gathers only the active features' decoder rows; each is run at every `--widths` (features per layer)
so the crossover that `--sparse-decode auto` should follow is measured. Collection writes fresh Zarr
stores of `--tokens` tokens and is compared with a bare forward pass over exactly the same blocks
(`--repeats` times each, interleaved, medians); the
torchrun comparison collects the same tokens with one and with two single-threaded ranks.
Prints a JSON record and writes it to <run-dir>/results.json; docs/performance.md holds the numbers.
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
from training.errors import UserError


@dataclass
class BenchCLTConfig:
    """CLT training throughput (dense vs sparse decoding) and collection vs the bare forward."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    tokens: int = field(default=200_000, metadata={"help": "tokens to collect"})
    steps: int = field(default=60, metadata={"help": "CLT training steps per decoder"})
    widths: list[int] = field(
        default_factory=lambda: [512, 2048], metadata={"help": "features per layer to compare decoders at"}
    )
    activations: list[str] = field(
        default_factory=lambda: ["topk", "jumprelu"],
        metadata={"help": "sparse decoding is exact for topk, approximate for jumprelu"},
    )
    k: int = field(default=16, metadata={"help": "k for topk"})
    torchrun: bool = field(default=True, metadata={"help": "also time one vs two torchrun writers"})
    torchrun_repeats: int = field(
        default=3,
        metadata={
            "help": "one- and two-rank collections, interleaved; medians are compared (one run each "
            "moved the ratio from 1.5× to 2.6×)"
        },
    )
    collection: bool = field(
        default=True,
        metadata={"help": "time collection against the bare forward (false: the torchrun comparison only)"},
    )
    blocks_per_shard: int = field(
        default=CollectConfig.blocks_per_shard, metadata={"help": "collection's shard size (blocks)"}
    )
    store_dir: str | None = field(
        default=None, metadata={"help": "where the benchmark's stores go (default: the system temp dir)"}
    )
    repeats: int = field(
        default=3, metadata={"help": "collection and forward timings, interleaved; medians are compared"}
    )
    training: bool = field(default=True, metadata={"help": "also time CLT training (false: collection only)"})
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


def matmul_peak_gflops(repeats: int = 5) -> dict:
    """This machine's dense float32 matmul rate: the best of square and CLT-like shapes."""
    shapes = {
        "1024^3": (1024, 1024, 1024),
        "2048x256x2048": (2048, 256, 2048),
        "2048x2048x256": (2048, 2048, 256),
    }
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * m * k * n / best / 1e9
    return {"by_shape": rates, "peak": max(rates.values()), "threads": torch.get_num_threads()}


def clt_flops_per_token(n_layers: int, d_model: int, n_features: int) -> float:
    """Dense multiply-adds ×2 of one training token: encoders (L·d·F), cross-layer decoders
    (F·d per (source ≤ target) pair), backward ≈ twice the forward."""
    forward = 2 * n_layers * d_model * n_features + 2 * n_features * d_model * n_layers * (n_layers + 1) // 2
    return 3 * forward


def collection_vs_forward(args, tmp: str) -> tuple[dict, object]:
    """Collection tokens/s (forward + hooks + Zarr writes: the store's own loop timer) against the bare
    transformer body over exactly the same blocks, `args.repeats` times each, interleaved so that any
    drift in the machine's load hits both alike; the overhead compares the medians. Setup (model and
    corpus loading, tokenisation) is reported apart: it is paid once per collection, not per token."""
    from statistics import median

    from transformers import AutoTokenizer

    from training.corpus.build import default_corpus_dir, load_corpus
    from training.mixtures import parse_mixture

    collect_tps, forward_tps, setup_s = [], [], []
    # collection's loop without writes, with each write mode, and "buffered": inline with direct I/O
    # turned off (the write before O_DIRECT), side by side
    breakdown: dict[str, list[float]] = {"none": [], "inline": [], "thread": [], "buffered": []}
    kernel_s: dict[str, list[float]] = {mode: [] for mode in breakdown}
    blocks = None
    for repeat in range(args.repeats):
        collect = CollectConfig(
            model_dir=args.model_dir,
            store=str(Path(tmp) / f"bench-{repeat}.zarr"),
            corpus_dir=args.corpus_dir,
            n_tokens=args.tokens,
            blocks_per_shard=args.blocks_per_shard,
        )
        start = time.perf_counter()
        store = collect_activations(collect)
        loop = store.attrs["last_collection_rank0"]
        setup_s.append(time.perf_counter() - start - loop["seconds"])
        collect_tps.append(loop["tokens"] / loop["seconds"])
        if blocks is None:
            tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
            train = load_corpus(args.corpus_dir or default_corpus_dir())["train"]
            blocks, block_langs = collection_blocks(
                tokenizer,
                list(train["text"]),
                list(train["lang"]),
                parse_mixture(collect.mixture),
                collect.n_tokens,
                collect.n_ctx,
                collect.seed,
            )
            blocks = blocks[: store.n_shards * collect.blocks_per_shard]
        forward_tps.append(forward_only_throughput(args.model_dir, blocks, collect.batch_size))
        for writes, tps in breakdown.items():
            rate, kernel = collection_loop_throughput(collect, blocks, block_langs, store, writes, tmp)
            tps.append(rate)
            kernel_s[writes].append(kernel)
    forward_with_head = forward_only_throughput(args.model_dir, blocks, collect.batch_size, with_head=True)
    # One shard's write alone (the last store's shard 0 rewritten with its own values): the part of the
    # overhead an inline write adds to the forward.
    from clt.store import ActivationStore, page_aligned_empty, write_shard

    writable = ActivationStore(store.url, writable=True)
    arrays = writable.read_shard(0, fields=("mlp_in", "mlp_out", "token_id", "lang", "position"))
    for name in ("mlp_in", "mlp_out"):  # in page-aligned buffers, as collection holds them (direct I/O)
        aligned = page_aligned_empty(arrays[name].shape, getattr(torch, str(arrays[name].dtype))).numpy()
        aligned[...] = arrays[name]
        arrays[name] = aligned
    write_s = []
    for _ in range(3):
        start = time.perf_counter()
        write_shard(writable, 0, arrays)
        write_s.append(time.perf_counter() - start)
    summary = {
        "tokens": loop["tokens"],
        "repeats": args.repeats,
        "tokens_per_s": collect_tps,
        "forward_only_tokens_per_s": forward_tps,
        "median_tokens_per_s": median(collect_tps),
        "median_forward_only_tokens_per_s": median(forward_tps),
        "forward_with_lm_head_tokens_per_s": forward_with_head,
        "zarr_overhead": median(forward_tps) / median(collect_tps) - 1,
        # collection's loop without writes (hooks + copies into the shard buffers), with each write on
        # the writer thread overlapping the next shard's forward (collection's default) or inline
        "hooks_and_copies_tokens_per_s": breakdown["none"],
        "writer_thread_tokens_per_s": breakdown["thread"],
        "inline_writes_tokens_per_s": breakdown["inline"],
        "buffered_writes_tokens_per_s": breakdown["buffered"],
        "hooks_and_copies_overhead": median(forward_tps) / median(breakdown["none"]) - 1,
        "writer_thread_overhead": median(forward_tps) / median(breakdown["thread"]) - 1,
        "inline_writes_overhead": median(forward_tps) / median(breakdown["inline"]) - 1,
        "buffered_writes_overhead": median(forward_tps) / median(breakdown["buffered"]) - 1,
        # kernel CPU seconds of the whole process during each loop (os.times): what the writes cost the
        # cores the forward runs on
        "loop_kernel_cpu_seconds": kernel_s,
        "setup_seconds": setup_s,
        "write_seconds_per_shard": median(write_s),
        "forward_seconds_per_shard": store.tokens_per_shard / median(forward_tps),
    }
    print(
        f"collection {summary['median_tokens_per_s']:,.0f} tok/s vs forward "
        f"{summary['median_forward_only_tokens_per_s']:,.0f} (median of {args.repeats}): overhead "
        f"{summary['zarr_overhead']:+.0%} (hooks and copies alone "
        f"{summary['hooks_and_copies_overhead']:+.0%}, "
        f"writes on a thread {summary['writer_thread_overhead']:+.0%}, "
        f"inline {summary['inline_writes_overhead']:+.0%}, "
        f"buffered inline writes {summary['buffered_writes_overhead']:+.0%}); "
        f"one shard's write {summary['write_seconds_per_shard']:.3f} s vs "
        f"its forward {summary['forward_seconds_per_shard']:.3f} s; setup {median(setup_s):.1f} s per "
        "collection",
        flush=True,
    )
    return summary, store


def collection_loop_throughput(
    collect: CollectConfig, blocks, block_langs, store, writes: str, tmp: str
) -> tuple[float, float]:
    """Stored tokens/s of collection's own shard loop (`clt.activations.fill_shards`) over the blocks of
    `store`, and the process's kernel CPU seconds meanwhile, with `writes` "none" (forward + hooks +
    copies into the shard buffers), "thread" (each shard written into a fresh store on a writer thread
    while the next is computed), "inline" (each written before the next is computed) or "buffered"
    (inline, with direct I/O off: every write through the page cache), timed like the store's loop
    timer."""
    import contextlib
    import os
    from unittest import mock

    from clt import store as store_module
    from clt.activations import fill_shards
    from clt.store import ActivationStore, create_store
    from training.fingerprint import model_fingerprint
    from training.models import load_model

    model, tokenizer = load_model(collect.model_dir)
    target = None
    if writes != "none":
        config = CollectConfig(**{**vars(collect), "store": str(Path(tmp) / f"loop-{writes}.zarr")})
        create_store(config, model, tokenizer, len(blocks), store.langs, model_fingerprint(collect.model_dir))
        target = ActivationStore(config.store, writable=True)
    lang_index = {lang: i for i, lang in enumerate(store.langs)}
    no_direct_io = mock.patch.object(store_module, "write_direct", lambda path, data: False)
    with no_direct_io if writes == "buffered" else contextlib.nullcontext():
        kernel, start = os.times().system, time.perf_counter()
        fill_shards(
            model, blocks, block_langs, lang_index, list(range(store.n_shards)), collect, target,
            "inline" if writes == "buffered" else writes,
        )  # fmt: skip
        seconds, kernel = time.perf_counter() - start, os.times().system - kernel
    return store.n_shards * store.tokens_per_shard / seconds, kernel


def torchrun_collection(args, tmp: str, n_ranks: int) -> float:
    """Collection tokens/s with `n_ranks` single-threaded torchrun ranks writing one store."""
    import os
    import subprocess
    import sys

    store = str(Path(tempfile.mkdtemp(dir=tmp)) / f"torchrun-{n_ranks}.zarr")  # (a fresh store per run)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n_ranks}",
        str(Path(__file__).resolve().parents[1] / "scripts" / "collect_activations.py"),
        "--model-dir",
        args.model_dir,
        "--store",
        store,
        "--n-tokens",
        str(args.tokens),
        "--blocks-per-shard",
        str(args.blocks_per_shard),
    ]
    if args.corpus_dir:
        command += ["--corpus-dir", args.corpus_dir]
    env = {**os.environ, "MLCLT_THREADS_PER_RANK": "1"}  # one core per rank: scaling per core
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    from clt.store import ActivationStore

    loop = ActivationStore(store).attrs["last_collection_rank0"]
    return n_ranks * loop["tokens"] / loop["seconds"]  # ranks hold equal shares of the shards


def torchrun_scaling(args, tmp: str) -> dict:
    """One rank against two, `args.torchrun_repeats` times each, interleaved so that drift in the
    machine's speed hits both alike; the speed-up compares the medians."""
    from statistics import median

    one, two = [], []
    for _ in range(args.torchrun_repeats):
        one.append(torchrun_collection(args, tmp, 1))
        two.append(torchrun_collection(args, tmp, 2))
    speedup = median(two) / median(one)
    print(f"torchrun 1 → 2 ranks: {median(one):,.0f} → {median(two):,.0f} tok/s (medians), {speedup:.2f}×")
    return {
        "one_rank_tokens_per_s": one,
        "two_ranks_tokens_per_s": two,
        "median_one_rank_tokens_per_s": median(one),
        "median_two_ranks_tokens_per_s": median(two),
        "speedup": speedup,
    }


def main(argv: list[str]) -> None:
    args = parse_config(BenchCLTConfig, argv)
    run = RunDir.open(args.run_dir, args, may_change=())
    result: dict = {"threads": torch.get_num_threads(), "matmul": matmul_peak_gflops()}
    if args.training and not args.collection:
        raise UserError(
            "CLT training is timed on the collected store: use --collection true or --training false"
        )
    with tempfile.TemporaryDirectory(dir=args.store_dir) as tmp:
        if args.collection:
            result["collection"], store = collection_vs_forward(args, tmp)
        if args.torchrun:
            result["torchrun_collection"] = torchrun_scaling(args, tmp)
        if not args.training:
            atomic_write_json(run.path / "results.json", result)
            print(json.dumps(result, indent=1))
            return
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(args.model_dir)

        training = []
        for activation, width in ((a, w) for a in args.activations for w in args.widths):
            row = {"activation": activation, "n_features": width}
            flops = clt_flops_per_token(model_config.n_layer, model_config.n_embd, width)
            # dense and sparse decoding (eager), and dense decoding with the loss compiled (--compile)
            for decoder, sparse, compiled in (
                ("dense", "false", False),
                ("sparse", "true", False),
                ("dense_compiled", "false", True),
            ):
                config = config_from_dict(
                    CLTTrainConfig,
                    {
                        "run_dir": str(Path(tmp) / f"clt-{activation}-{width}-{decoder}"),
                        "model_dir": args.model_dir,
                        "store": store.url,
                        "corpus_dir": args.corpus_dir,
                        "n_features": width,
                        "activation": activation,
                        "k": args.k,
                        "max_steps": args.steps,
                        "sparse_decode": sparse,
                        "compile": compiled,
                        "eval_blocks": 2,
                        "log_every": 10,
                        "ckpt_every": 10**9,
                    },
                )
                report = train_clt(config)
                # Training throughput after the first logged window (which holds the compilation).
                logged = [
                    r["tokens_per_s"] for r in RunDir(config.run_dir).read_metrics() if "tokens_per_s" in r
                ]
                row[decoder] = {
                    "tokens_per_s": report["train_tokens_per_s"],
                    "steady_tokens_per_s": sum(logged[1:]) / max(1, len(logged[1:])),
                    "fraction_of_matmul_peak": report["train_tokens_per_s"]
                    * flops
                    / 1e9
                    / result["matmul"]["peak"],
                    "heldout_mean_l0": report["heldout"]["all"]["mean_l0"],
                    "heldout_mean_fvu": report["heldout"]["all"]["mean_fvu"],
                }
            row["sparse_speedup"] = row["sparse"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
            row["compile_speedup"] = (
                row["dense_compiled"]["steady_tokens_per_s"] / row["dense"]["steady_tokens_per_s"]
            )
            training.append(row)
            print(
                f"{activation} {width} features: dense {row['dense']['tokens_per_s']:,.0f} tok/s "
                f"({row['dense']['fraction_of_matmul_peak']:.0%} of peak), sparse "
                f"{row['sparse']['tokens_per_s']:,.0f} (×{row['sparse_speedup']:.2f}), dense compiled "
                f"{row['dense_compiled']['steady_tokens_per_s']:,.0f} after compiling "
                f"(×{row['compile_speedup']:.2f})",
                flush=True,
            )
        result["training"] = training
    atomic_write_json(run.path / "results.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
