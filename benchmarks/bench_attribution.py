"""Attribution speed and memory: ours vs circuit-tracer, same model, CLT and prompts, CPU.

    python benchmarks/bench_attribution.py --model-dir runs/tiny-en-heavy/model \
        --clt runs/sweep-clt-plt/clt-lambda1/clt --lengths 16,64,128 --out docs/attribution_bench.json

Each (implementation, prompt length, prompt) runs in a fresh subprocess, so that its peak resident
memory is its own (VmHWM from /proc/self/status: unlike ru_maxrss, it is not inherited from the parent
across fork + exec); the memory baseline (model + CLT loaded, before attributing) is reported
next to it. Time is the best of --repeats after one warm-up. Prompts are held-out validation blocks of
exactly N tokens (BOS included) in en, fr and de. circuit-tracer runs at several batch sizes (its
forward pass is batched over `batch_size` copies of the prompt) and its best is compared. Every pair of
graphs is checked for identical active features and edges (max |Δ| / max |A|).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from training import paths


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


def worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    torch.set_num_threads(args.threads)
    model, tokenizer, clt = load(args.model_dir, args.clt)
    tokens = prompts_of_length(tokenizer, args.length, args.langs.split(","))[args.prompt_index]
    if args.impl == "ours":
        from attribution.attribute import attribute

        def run():
            graph = attribute(model, clt, tokens, tokenizer=tokenizer, batch_size=args.batch_size)
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
            graph = ct_attribute(tokens, replacement, batch_size=args.batch_size, verbose=True)
            return graph.active_features, graph.adjacency_matrix, [p for p in phases if "completed in" in p]

    baseline_mb = peak_rss_mb()
    run()  # warm-up
    times = []
    for _ in range(args.repeats):
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


def measure(args, impl: str, length: int, prompt_index: int, batch_size: int, save: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
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
        args.langs,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--save",
        save,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=paths.MODEL_DIR)
    parser.add_argument("--clt", default="runs/sweep-clt-plt/clt-lambda1/clt")
    parser.add_argument("--lengths", default="16,64,128")
    parser.add_argument("--langs", default="en,fr,de")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="ours")
    parser.add_argument("--ct-batch-sizes", default="64,256,512", help="circuit-tracer (its default is 512)")
    parser.add_argument("--out", default="docs/attribution_bench.json")
    # worker-only
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--impl", default="ours")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--prompt-index", type=int, default=0)
    parser.add_argument("--save", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from safetensors.torch import load_file

    results = []
    tmp = Path(tempfile.mkdtemp())
    for length in [int(x) for x in args.lengths.split(",")]:
        for prompt_index in range(len(args.langs.split(","))):
            ours = measure(args, "ours", length, prompt_index, args.batch_size, str(tmp / "ours.safetensors"))
            theirs = []
            for batch_size in [int(x) for x in args.ct_batch_sizes.split(",")]:
                theirs.append(
                    measure(
                        args,
                        "circuit-tracer",
                        length,
                        prompt_index,
                        batch_size,
                        str(tmp / f"ct{batch_size}.safetensors"),
                    )
                )
            a, b = (
                load_file(str(tmp / "ours.safetensors")),
                load_file(str(tmp / f"ct{theirs[-1]['batch_size']}.safetensors")),
            )
            same_features = torch.equal(a["active"], b["active"])
            edge_error = float((a["adjacency"] - b["adjacency"]).abs().max() / b["adjacency"].abs().max())
            best = min(theirs, key=lambda r: r["time_s"])
            row = {
                "length": length,
                "lang": args.langs.split(",")[prompt_index],
                "n_active_features": ours["n_active_features"],
                "ours": ours,
                "circuit_tracer": theirs,
                "ct_best_time_s": best["time_s"],
                "ct_best_batch_size": best["batch_size"],
                "speedup_vs_best": best["time_s"] / ours["time_s"],
                "speedup_vs_default": next(
                    r["time_s"] for r in theirs if r["batch_size"] == theirs[-1]["batch_size"]
                )
                / ours["time_s"],
                "same_active_features": same_features,
                "max_relative_edge_difference": edge_error,
            }
            results.append(row)
            print(
                f"{length:4d} tokens {row['lang']}: {row['n_active_features']:5d} features | ours {ours['time_s']:.3f} s "
                f"(peak {ours['peak_rss_mb']:.0f} MB, base {ours['baseline_rss_mb']:.0f}) | circuit-tracer best "
                f"{best['time_s']:.3f} s @bs{best['batch_size']} (peak {best['peak_rss_mb']:.0f} MB) | ×{row['speedup_vs_best']:.1f} "
                f"| same features {same_features}, max rel edge diff {edge_error:.1e}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "config": {
                    k: v
                    for k, v in vars(args).items()
                    if k not in ("worker", "impl", "length", "prompt_index", "save")
                },
                "torch_threads": args.threads,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
