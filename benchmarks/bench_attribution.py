"""Attribution speed and memory: ours vs circuit-tracer, same model, CLT and prompts, CPU.

    python benchmarks/bench_attribution.py --model-dir runs/pretrain-tiny-en-heavy/model \
        --clt runs/sweep-clt-per-layer/clt-lambda1/clt --lengths 16,64,128 --run-dir runs/bench-attribution
    cp runs/bench-attribution/results.json docs/attribution_bench.json

Each (implementation, prompt length, prompt) runs in a fresh subprocess, so that its peak resident
memory is its own (VmHWM from /proc/self/status: unlike ru_maxrss, it is not inherited from the parent
across fork + exec); the memory baseline (model + CLT loaded, before attributing) is reported
next to it. Time is the best of --repeats after one warm-up. Prompts are held-out validation blocks of
exactly N tokens (BOS included) in en, fr and de. circuit-tracer runs at several batch sizes (its
forward pass is batched over `batch_size` copies of the prompt) and its best is compared. Every pair of
graphs is checked for identical active features and edges (max |Δ| / max |A|).

A third kind of worker, `ours-memory`, builds one graph the way `scripts/attribute.py` does (attribution
+ pruning, with --max-feature-nodes if given) and reports the memory estimate printed before the edges
next to the measured peak, and the size on disk of the saved graph: the default (pruned edges + active-
feature table) and the full float32 adjacency.
"""

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import paths
from training.config import RunDir, atomic_write_json, parse_config, run_main


@dataclass
class BenchAttributionConfig:
    """Attribution speed and memory, ours vs circuit-tracer (each measurement in a fresh subprocess)."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    clt: str = field(
        default="runs/sweep-clt-per-layer/clt-lambda1/clt", metadata={"help": "CLT directory (native)"}
    )
    lengths: list[int] = field(
        default_factory=lambda: [16, 64, 128], metadata={"help": "prompt lengths (BOS included)"}
    )
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de"], metadata={"help": "one prompt per language"}
    )
    repeats: int = field(default=2, metadata={"help": "timed runs after the warm-up (best is reported)"})
    rounds: int = field(
        default=1,
        metadata={"help": "processes per measurement, ours and circuit-tracer alternating (times pooled)"},
    )
    warmup: bool = field(
        default=True, metadata={"help": "one untimed run first (off for long prompts, where it is noise)"}
    )
    threads: int = field(default=2, metadata={"help": "torch threads per worker"})
    batch_size: int = field(default=64, metadata={"help": "our targets per backward pass"})
    ct_batch_sizes: list[int] = field(
        default_factory=lambda: [64, 256, 512],
        metadata={"help": "circuit-tracer batch sizes (its default is 512)"},
    )
    max_feature_nodes: int | None = field(
        default=None, metadata={"help": "feature budget for every graph (ours and circuit-tracer's)"}
    )
    memory_lengths: list[int] = field(
        default_factory=list,
        metadata={"help": "prompt lengths for the memory-estimate and disk-size check (default: --lengths)"},
    )
    skip_circuit_tracer: bool = field(
        default=False,
        metadata={"help": "only the memory/disk check (e.g. lengths circuit-tracer cannot fit)"},
    )
    run_dir: str = field(default="runs/bench-attribution", metadata={"help": "run directory (results.json)"})
    # One measurement in this process (set by the parent for its workers):
    worker: bool = field(default=False, metadata={"help": "internal: run one measurement and print JSON"})
    impl: str = field(default="ours", metadata={"help": "internal: ours or circuit-tracer"})
    length: int = field(default=16, metadata={"help": "internal: the worker's prompt length"})
    prompt_index: int = field(default=0, metadata={"help": "internal: the worker's prompt"})
    save: str = field(default="", metadata={"help": "internal: where the worker saves its graph"})


def load(model_dir: str, clt_dir: str):
    from attribution.pipeline import load_model_and_clt

    return load_model_and_clt(model_dir, clt_dir)


def prompts_of_length(tokenizer, length: int, langs: list[str]) -> list[torch.Tensor]:
    from clt.train import evaluation_blocks

    blocks, block_langs = evaluation_blocks(None, tokenizer, langs, n_ctx=length, per_lang=1)
    return [blocks[block_langs.index(lang)] for lang in langs]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def memory_worker(args, model, tokenizer, clt, tokens) -> None:
    """One graph as scripts/attribute.py builds it: estimate vs measured peak, size on disk."""
    from attribution.export import export_all
    from attribution.pipeline import build_graph

    baseline_mb = peak_rss_mb()
    graph, pruned = build_graph(
        model, tokenizer, clt, tokens, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes
    )
    peak_mb = peak_rss_mb()
    out = Path(tempfile.mkdtemp())
    export_all(graph, out / "default", "g", pruned)
    graph.save(out / "full-float32", pruned, "float32")
    print(
        json.dumps(
            {
                "length": args.length,
                "n_active_features": graph.metadata["n_active_features"],
                "feature_nodes": graph.n_features,
                "baseline_rss_mb": baseline_mb,
                "peak_rss_mb": peak_mb,
                "estimate_mb": graph.metadata["memory_estimate_bytes"] / 2**20,
                "estimate_over_peak": graph.metadata["memory_estimate_bytes"] / 2**20 / peak_mb,
                "graph_dir_mb": directory_mb(out / "default"),
                "saved_graph_mb": directory_mb(out / "default" / "graph"),
                "full_float32_graph_mb": directory_mb(out / "full-float32"),
                "nodes_kept": int(pruned.node_mask.sum()),
                "time_s": sum(graph.metadata["timings"].values()),
            }
        )
    )


def worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    torch.set_num_threads(args.threads)
    model, tokenizer, clt = load(args.model_dir, args.clt)
    tokens = prompts_of_length(tokenizer, args.length, args.langs)[args.prompt_index]
    if args.impl == "ours-memory":
        return memory_worker(args, model, tokenizer, clt, tokens)
    if args.impl == "ours":
        from attribution.attribute import attribute

        def run():
            graph = attribute(
                model,
                clt,
                tokens,
                tokenizer=tokenizer,
                batch_size=args.batch_size,
                max_feature_nodes=args.max_feature_nodes,
            )
            return graph.active_features, graph.adjacency, graph.metadata["timings"]
    else:
        import logging

        from circuit_tracer.attribution.attribute import attribute as ct_attribute

        from attribution.circuit_tracer_bridge import circuit_tracer_model
        from clt.export import export_circuit_tracer

        export_dir = Path(tempfile.mkdtemp()) / "clt"
        export_circuit_tracer(clt, export_dir)
        replacement = circuit_tracer_model(model, tokenizer, export_dir)
        phases = []

        class Capture(logging.Handler):
            def emit(self, record):
                phases.append(record.getMessage())

        logging.getLogger("attribution").addHandler(Capture())

        def run():
            phases.clear()
            graph = ct_attribute(
                tokens,
                replacement,
                batch_size=args.batch_size,
                verbose=True,
                max_feature_nodes=args.max_feature_nodes,
            )
            # (the graph's nodes are the selected features: all active ones unless a budget is set)
            nodes = graph.active_features[graph.selected_features]
            return nodes, graph.adjacency_matrix, [p for p in phases if "completed in" in p]

    baseline_mb = peak_rss_mb()
    if args.warmup:
        run()
    times = []
    for _ in range(args.repeats):
        active = adjacency = detail = None  # the last graph is freed first: peaks are one run's own
        start = time.perf_counter()
        active, adjacency, detail = run()
        times.append(time.perf_counter() - start)
    peak_mb = peak_rss_mb()
    from safetensors.torch import save_file

    save_file({"active": active.contiguous(), "adjacency": adjacency.float().contiguous()}, args.save)
    print(
        json.dumps(
            {
                "impl": args.impl,
                "length": args.length,
                "prompt": args.prompt_index,
                "batch_size": args.batch_size,
                "time_s": min(times),
                "times_s": times,
                "baseline_rss_mb": baseline_mb,
                "peak_rss_mb": peak_mb,
                "n_active_features": int(len(active)),
                "detail": detail,
            }
        )
    )


def pooled(rounds: list[dict]) -> dict:
    """One measurement from its rounds (each a process of its own): every repeat's time kept, the best
    reported, and the round with the highest peak."""
    times = [t for r in rounds for t in r["times_s"]]
    highest = max(rounds, key=lambda r: r["peak_rss_mb"])
    return {
        **rounds[0],
        "times_s": times,
        "time_s": min(times),
        "round_times_s": [r["time_s"] for r in rounds],
        "peak_rss_mb": highest["peak_rss_mb"],
        "baseline_rss_mb": highest["baseline_rss_mb"],
    }


def measure(args, impl: str, length: int, prompt_index: int, batch_size: int, save: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "true",
        "--impl",
        impl,
        "--length",
        str(length),
        "--prompt-index",
        str(prompt_index),
        "--batch-size",
        str(batch_size),
        "--model-dir",
        args.model_dir,
        "--clt",
        args.clt,
        "--langs",
        ",".join(args.langs),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup).lower(),
        "--save",
        save,
    ]
    if args.max_feature_nodes is not None:
        command += ["--max-feature-nodes", str(args.max_feature_nodes)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise WorkerFailed(f"{impl} worker failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class WorkerFailed(RuntimeError):
    """A measurement's subprocess died (e.g. killed for memory at a large batch size)."""


def main(argv: list[str]) -> None:
    args = parse_config(BenchAttributionConfig, argv)
    if args.worker:
        return worker(args)
    run = RunDir.open(args.run_dir, args, may_change=())
    from safetensors.torch import load_file

    results = []
    tmp = Path(tempfile.mkdtemp())
    for length in [] if args.skip_circuit_tracer else args.lengths:
        for prompt_index in range(len(args.langs)):
            # Rounds alternate ours and circuit-tracer (fresh processes each), so that a slow spell of the
            # machine hits both: short prompts' times moved by up to ≈ 40% between processes.
            ours_rounds, theirs_rounds, failures = [], {b: [] for b in args.ct_batch_sizes}, {}
            for _ in range(args.rounds):
                save = str(tmp / "ours.safetensors")
                ours_rounds.append(measure(args, "ours", length, prompt_index, args.batch_size, save))
                for batch_size in [b for b in args.ct_batch_sizes if b not in failures]:
                    save = str(tmp / f"ct{batch_size}.safetensors")
                    try:
                        theirs_rounds[batch_size].append(
                            measure(args, "circuit-tracer", length, prompt_index, batch_size, save)
                        )
                    except WorkerFailed as error:  # a batch size that does not fit is a result, not the end
                        failures[batch_size] = {
                            "batch_size": batch_size,
                            "error": str(error).splitlines()[-1],
                        }
                        print(
                            f"{length:4d} tokens: circuit-tracer at batch {batch_size} failed: "
                            f"{failures[batch_size]}"
                        )
            ours = pooled(ours_rounds)
            theirs = [pooled(rounds) for rounds in theirs_rounds.values() if rounds]
            failed = list(failures.values())
            if not theirs:
                raise WorkerFailed(f"circuit-tracer failed at every batch size at {length} tokens: {failed}")
            # Edges are compared with circuit-tracer at our batch size where it ran: under a feature budget
            # the features are re-ranked every update_interval batches, so the selection depends on it.
            reference = next((r for r in theirs if r["batch_size"] == args.batch_size), theirs[-1])
            a, b = (
                load_file(str(tmp / "ours.safetensors")),
                load_file(str(tmp / f"ct{reference['batch_size']}.safetensors")),
            )
            same_features = a["active"].shape == b["active"].shape and torch.equal(a["active"], b["active"])
            if not same_features:  # different node sets: their edges cannot be compared entry by entry
                edge_error = float("nan")
            else:
                edge_error = float((a["adjacency"] - b["adjacency"]).abs().max() / b["adjacency"].abs().max())
            best = min(theirs, key=lambda r: r["time_s"])
            row = {
                "length": length,
                "lang": args.langs[prompt_index],
                "n_active_features": ours["n_active_features"],
                "ours": ours,
                "circuit_tracer": theirs,
                "circuit_tracer_failed": failed,
                "ct_best_time_s": best["time_s"],
                "ct_best_batch_size": best["batch_size"],
                "speedup_vs_best": best["time_s"] / ours["time_s"],
                "speedup_vs_default": next(
                    r["time_s"] for r in theirs if r["batch_size"] == theirs[-1]["batch_size"]
                )
                / ours["time_s"],
                "compared_with_batch_size": reference["batch_size"],
                "same_active_features": same_features,
                "max_relative_edge_difference": edge_error,
            }
            results.append(row)
            # Written after every row: a run stopped early keeps what it measured.
            atomic_write_json(
                run.path / "results.json", {"torch_threads": args.threads, "results": results, "memory": []}
            )
            print(
                f"{length:4d} tokens {row['lang']}: {row['n_active_features']:5d} features | ours "
                f"{ours['time_s']:.3f} s "
                f"(peak {ours['peak_rss_mb']:.0f} MB, base {ours['baseline_rss_mb']:.0f}) | circuit-tracer "
                "best "
                f"{best['time_s']:.3f} s @bs{best['batch_size']} (peak {best['peak_rss_mb']:.0f} MB, base "
                f"{best['baseline_rss_mb']:.0f}) | "
                f"×{row['speedup_vs_best']:.1f} "
                f"| same features {same_features}, max rel edge diff {edge_error:.1e}",
                flush=True,
            )
    memory = []
    for length in args.memory_lengths or args.lengths:
        row = measure(args, "ours-memory", length, 0, args.batch_size, "")
        memory.append(row)
        print(
            f"{length:4d} tokens: {row['feature_nodes']:,} of {row['n_active_features']:,} features | "
            f"estimate {row['estimate_mb']:.0f} MB vs peak {row['peak_rss_mb']:.0f} MB "
            f"(×{row['estimate_over_peak']:.2f}) | "
            f"on disk {row['graph_dir_mb']:.2f} MB with every export (graph {row['saved_graph_mb']:.2f} MB; "
            f"full float32 adjacency {row['full_float32_graph_mb']:.0f} MB)",
            flush=True,
        )
    atomic_write_json(
        run.path / "results.json", {"torch_threads": args.threads, "results": results, "memory": memory}
    )
    print(f"written to {run.path / 'results.json'}")


if __name__ == "__main__":
    run_main(main)
