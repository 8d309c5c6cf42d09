"""Attribution graphs for a prompt or a file of prompts, as a run directory.

`run_attribution(AttributeConfig(...))` builds, prunes and exports one graph per prompt into
`graphs/<slug>/` and appends a record per prompt; a re-run skips prompts whose record exists with the
same text (the record is written after the exports, so a killed run redoes the prompt it was on).
Prompts may change between runs of one directory; the model, CLT and settings may not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from attribution.export import export_all
from attribution.graph import ADJACENCY_FORMATS
from attribution.memory import available_bytes, parse_bytes
from attribution.pipeline import build_graph
from training import paths
from training.config import RunDir
from training.errors import UserError
from training.fingerprint import input_fingerprints

MAY_CHANGE = ("device", "prompt", "prompts", "lang", "save_adjacency", "max_memory")


@dataclass
class AttributeConfig:
    """Build, prune and export attribution graphs."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    clt: str = field(default=paths.CLT_DIR, metadata={"help": "transcoder directory (native format)"})
    prompt: str | None = field(default=None, metadata={"help": "one prompt"})
    prompts: str | None = field(
        default=None, metadata={"help": "file of prompts: one per line, or JSONL with text (+ lang, slug)"}
    )
    lang: str | None = field(default=None, metadata={"help": "language of --prompt (tags the nodes)"})
    run_dir: str = field(default="runs/attribution", metadata={"help": "output run directory"})
    target: str = field(default="salient", metadata={"help": "salient | token:TEXT | lang:XX"})
    translations: str | None = field(default=None, metadata={"help": "JSON {lang: word} for lang:XX targets"})
    max_tokens: int = field(
        default=128,
        metadata={"help": "keep at most this many tokens of a prompt (BOS included; a cut is reported)"},
    )
    max_n_logits: int = field(default=10, metadata={"help": "at most this many salient logits"})
    desired_logit_prob: float = field(
        default=0.95, metadata={"help": "salient logits up to this cumulative probability"}
    )
    node_threshold: float = field(
        default=0.8, metadata={"help": "pruning: keep nodes to this share of influence"}
    )
    edge_threshold: float = field(
        default=0.98, metadata={"help": "pruning: keep edges to this share of edge score"}
    )
    batch_size: int = field(
        default=64, metadata={"help": "targets per backward pass (64 was fastest on 2 CPU cores)"}
    )
    max_feature_nodes: int | None = field(
        default=None,
        metadata={
            "help": "feature budget: rows only for this many most influential features (circuit-tracer's "
            "max_feature_nodes); bounds the memory of long prompts. Default: every active feature"
        },
    )
    max_memory: str = field(
        default="auto",
        metadata={
            "help": "memory the run may use, e.g. 24GB (auto: what the machine has available); a prompt "
            "whose estimate is over it is refused up front with the flags that would make it fit"
        },
    )
    save_adjacency: str = field(
        default="pruned",
        metadata={
            "help": "what of the adjacency to keep on disk: pruned (the kept edges; a few MB), or the full "
            "matrix as sparse | float16 | float32 (hundreds of MB for a 128-token prompt)"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "float32 or float64"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    allow_model_mismatch: bool = field(
        default=False, metadata={"help": "use a CLT trained on other weights (e.g. before fine-tuning)"}
    )


def read_prompts(config: AttributeConfig) -> list[dict]:
    if bool(config.prompt) == bool(config.prompts):
        raise UserError("give exactly one of --prompt or --prompts")
    if config.prompt:
        return [{"text": config.prompt, "lang": config.lang, "slug": "prompt"}]
    path = Path(config.prompts)
    if not path.exists():
        raise UserError(f"prompts file {path} not found")
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        item = json.loads(line) if path.suffix == ".jsonl" else {"text": line}
        item.setdefault("lang", config.lang)
        item.setdefault("slug", f"{len(items):03d}" + (f"-{item['lang']}" if item.get("lang") else ""))
        items.append(item)
    if not items:
        raise UserError(f"{path} holds no prompts")
    return items


def run_attribution(config: AttributeConfig) -> list[dict]:
    from clt.export import load_model_and_clt

    if config.dtype not in ("float32", "float64"):
        raise UserError("--dtype must be float32 or float64")
    if config.save_adjacency not in ADJACENCY_FORMATS:
        raise UserError(f"--save-adjacency must be one of {', '.join(ADJACENCY_FORMATS)}")
    if config.max_feature_nodes is not None and config.max_feature_nodes < 1:
        raise UserError("--max-feature-nodes must be at least 1")
    prompts = read_prompts(config)
    run = RunDir.open(config.run_dir, config, may_change=MAY_CHANGE)
    model, tokenizer, clt = load_model_and_clt(
        config.model_dir, config.clt, config.device, config.allow_model_mismatch
    )
    run.check_inputs(input_fingerprints(config.model_dir, config.clt))  # finished graphs are reused
    translations = json.loads(config.translations) if config.translations else None
    device = next(model.parameters()).device
    max_memory = available_bytes(device) if config.max_memory == "auto" else parse_bytes(config.max_memory)
    done = run.keyed(("slug", "text"))
    records = []
    for item in tqdm(prompts, desc="graphs", unit="prompt"):
        if (item["slug"], item["text"]) in done:
            records.append(done[(item["slug"], item["text"])])
            continue
        out = run.path / "graphs" / item["slug"]
        graph, pruned = build_graph(
            model,
            tokenizer,
            clt,
            item["text"],
            target=config.target,
            translations=translations,
            lang=item.get("lang"),
            max_tokens=config.max_tokens,
            max_n_logits=config.max_n_logits,
            desired_logit_prob=config.desired_logit_prob,
            node_threshold=config.node_threshold,
            edge_threshold=config.edge_threshold,
            batch_size=config.batch_size,
            dtype=getattr(torch, config.dtype),
            max_feature_nodes=config.max_feature_nodes,
            max_memory=max_memory,
            report=tqdm.write,
        )
        graph.metadata.update(model=config.model_dir, clt=config.clt)
        exported = export_all(graph, out, item["slug"], pruned, config.node_threshold, config.save_adjacency)
        record = {
            "slug": item["slug"],
            "text": item["text"],
            "lang": item.get("lang"),
            "n_tokens": graph.n_pos,
            "n_active_features": graph.metadata["n_active_features"],
            "feature_nodes": graph.n_features,
            "memory_estimate_gb": round(graph.metadata["memory_estimate_bytes"] / 2**30, 3),
            **graph.metadata["pruning"],
            **graph.metadata["scores"],
            **graph.metadata["timings"],
            "targets": graph.target_labels,
            "html": str(exported["html"]),
        }
        run.log_metrics(record)  # last: the record marks the prompt done
        records.append(record)
        tqdm.write(
            f"{item['slug']}: {graph.n_pos} tokens, {graph.n_features} active features → "
            f"{record['nodes_kept']} nodes / {record['edges_kept']} edges kept; replacement "
            f"{record['replacement']:.3f}, completeness {record['completeness']:.3f}; view {exported['html']}"
        )
    return records
