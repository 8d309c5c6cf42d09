"""Attribution graphs of the CLT replacement model for one prompt or a file of prompts.

    python scripts/attribute.py --model runs/tiny-en-heavy/model --clt runs/clt-tiny-en-heavy/clt \
        --prompt "Click OK to close the"
    python scripts/attribute.py --model ... --clt ... --prompts prompts.jsonl   # {"text": ..., "lang": ...} per line
    python scripts/attribute.py ... --prompt "Le rapport est prêt" --target lang:fr \
        --translations '{"en": "Friday", "fr": "vendredi", "de": "Freitag"}'

Writes into --run-dir: config.json, metrics.jsonl (one record per prompt: features, nodes/edges kept,
scores, timings) and graphs/<slug>/ with the saved graph (safetensors + JSON), circuit-tracer graph
JSON (serve with `python -m circuit_tracer.frontend.local_server` pointed at graphs/<slug>/circuit_tracer),
GraphML, a self-contained HTML view and a PNG. Re-running skips prompts already done.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from attribution.export import export_all
from attribution.pipeline import build_graph, load_model_and_clt
from training.config import RunDir, atomic_write_text, parse_config


@dataclass
class AttributeConfig:
    """Build, prune and export attribution graphs."""

    model: str = field(default="runs/pretrain-tiny-en-heavy/model", metadata={"help": "HF model directory"})
    clt: str = field(default="runs/clt-tiny-en-heavy/clt", metadata={"help": "transcoder directory (native format)"})
    prompt: str | None = field(default=None, metadata={"help": "one prompt"})
    prompts: str | None = field(default=None, metadata={"help": "file of prompts: one per line, or JSONL with text (+ lang, slug)"})
    lang: str | None = field(default=None, metadata={"help": "language of --prompt (tags the nodes)"})
    run_dir: str = field(default="runs/attribution", metadata={"help": "output run directory"})
    target: str = field(default="salient", metadata={"help": "salient | token:TEXT | lang:XX"})
    translations: str | None = field(default=None, metadata={"help": "JSON {lang: word} for lang:XX targets"})
    max_tokens: int = field(default=128, metadata={"help": "truncate prompts to this many tokens (BOS included)"})
    max_n_logits: int = field(default=10, metadata={"help": "at most this many salient logits"})
    desired_logit_prob: float = field(default=0.95, metadata={"help": "salient logits up to this cumulative probability"})
    node_threshold: float = field(default=0.8, metadata={"help": "pruning: keep nodes to this share of influence"})
    edge_threshold: float = field(default=0.98, metadata={"help": "pruning: keep edges to this share of edge score"})
    batch_size: int = field(default=64, metadata={"help": "targets per backward pass (64 was fastest on 2 CPU cores)"})
    dtype: str = field(default="float32", metadata={"help": "float32 or float64"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    allow_model_mismatch: bool = field(default=False, metadata={"help": "use a CLT trained on other weights (e.g. before fine-tuning)"})


def read_prompts(config: AttributeConfig) -> list[dict]:
    if bool(config.prompt) == bool(config.prompts):
        raise SystemExit("give exactly one of --prompt or --prompts")
    if config.prompt:
        return [{"text": config.prompt, "lang": config.lang, "slug": "prompt"}]
    path = Path(config.prompts)
    if not path.exists():
        raise SystemExit(f"prompts file {path} not found")
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        item = json.loads(line) if path.suffix == ".jsonl" else {"text": line}
        item.setdefault("lang", config.lang)
        item.setdefault("slug", f"{len(items):03d}" + (f"-{item['lang']}" if item.get("lang") else ""))
        items.append(item)
    if not items:
        raise SystemExit(f"{path} holds no prompts")
    return items


def main(argv=None) -> None:
    config = parse_config(AttributeConfig, argv)
    if config.dtype not in ("float32", "float64"):
        raise SystemExit("--dtype must be float32 or float64")
    prompts = read_prompts(config)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device)
    model, tokenizer, clt = load_model_and_clt(config.model, config.clt, device, config.allow_model_mismatch)
    translations = json.loads(config.translations) if config.translations else None
    run = RunDir(config.run_dir)
    run.save_config(config)
    for item in tqdm(prompts, desc="graphs", unit="prompt"):
        out = run.path / "graphs" / item["slug"]
        if (out / "DONE").exists():
            continue
        graph, pruned = build_graph(
            model, tokenizer, clt, item["text"], target=config.target, translations=translations, lang=item.get("lang"),
            max_tokens=config.max_tokens, max_n_logits=config.max_n_logits, desired_logit_prob=config.desired_logit_prob,
            node_threshold=config.node_threshold, edge_threshold=config.edge_threshold, batch_size=config.batch_size,
            dtype=getattr(torch, config.dtype))
        graph.metadata.update(model=config.model, clt=config.clt)
        paths = export_all(graph, out, item["slug"], pruned, config.node_threshold)
        atomic_write_text(out / "DONE", "")  # last: a killed run redoes this prompt
        record = {"slug": item["slug"], "lang": item.get("lang"), "n_tokens": graph.n_pos,
                  "n_active_features": graph.n_features, **graph.metadata["pruning"], **graph.metadata["scores"],
                  **graph.metadata["timings"], "targets": graph.target_labels}
        run.log_metrics(record)
        tqdm.write(f"{item['slug']}: {graph.n_pos} tokens, {graph.n_features} active features → "
                   f"{record['nodes_kept']} nodes / {record['edges_kept']} edges kept; replacement "
                   f"{record['replacement']:.3f}, completeness {record['completeness']:.3f}; view {paths['html']}")


if __name__ == "__main__":
    main()
