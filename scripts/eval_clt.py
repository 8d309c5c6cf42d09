"""Evaluate a trained transcoder: per-layer FVU, L0 and dead fraction on stored activations, and the
replacement model (every MLP replaced) vs the real model — KL, Δ-CE, top-1 agreement, per language.

    python scripts/eval_clt.py --clt runs/clt-tiny-en-heavy/clt --model-dir runs/pretrain-tiny-en-heavy/model \
        --store runs/activations/tiny-en-heavy.zarr
"""

import json
from dataclasses import dataclass, field

import torch

from clt.activations import ActivationStore, model_fingerprint
from clt.evaluate import replacement_metrics, store_metrics
from clt.export import check_matches_model, load_native
from clt.train import evaluation_blocks, format_summary
from training import paths
from training.config import atomic_write_json, parse_config
from training.corpus.build import default_corpus_dir, load_corpus


@dataclass
class EvalConfig:
    """Evaluate a transcoder saved by train_clt.py."""

    clt: str = field(default=paths.CLT_DIR, metadata={"help": "transcoder directory (native format)"})
    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    store: str | None = field(default=None, metadata={"help": "activation store for FVU/L0 (optional)"})
    shards: list[int] = field(
        default_factory=list, metadata={"help": "store shards to evaluate on (default: the last)"}
    )
    corpus_dir: str | None = field(
        default=None, metadata={"help": "corpus for the replacement-model evaluation"}
    )
    eval_blocks: int = field(default=32, metadata={"help": "validation blocks per language"})
    n_ctx: int = field(default=64, metadata={"help": "block length"})
    out: str | None = field(default=None, metadata={"help": "write the JSON report here"})


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = parse_config(EvalConfig, argv)
    clt, meta = load_native(config.clt)
    model = AutoModelForCausalLM.from_pretrained(config.model_dir).eval()
    check_matches_model(meta, model)
    if meta.get("model_sha256") and meta["model_sha256"] != model_fingerprint(config.model_dir):
        print(
            f"warning: {config.clt} was trained on {meta.get('model_dir')}, not on these weights "
            "(expected when diffing a fine-tuned model; reconstruction will be worse)"
        )
    report: dict = {}
    langs = None
    if config.store:
        store = ActivationStore(config.store)
        report["heldout"] = store_metrics(clt, store, config.shards or store.done_shards[-1:])
        langs = store.langs
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    langs = langs or sorted(set(load_corpus(config.corpus_dir or default_corpus_dir())["validation"]["lang"]))
    blocks, block_langs = evaluation_blocks(
        config.corpus_dir, tokenizer, langs, config.n_ctx, config.eval_blocks
    )
    with torch.no_grad():
        report["replacement"] = replacement_metrics(model, clt, blocks, block_langs)
    print(format_summary(report))
    if config.out:
        atomic_write_json(config.out, report)
        print(f"report written to {config.out}")
    else:
        print(json.dumps(report["replacement"]["all"], indent=1))


if __name__ == "__main__":
    main()
