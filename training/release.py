"""Release a base model as `models/<name>/`: the model (fp16 safetensors + tokenizer + config), its CLT
(native, fp16), the located language units and a MANIFEST.json (sha256 of every file, the exact command,
the corpus fingerprint, headline metrics measured on the released files themselves).

Rounding to fp16 changes the weights, so the CLT and `located.json` are re-pointed at the released
weights' sha256 (the hash they were made on is kept as `trained_on_model_sha256`), and the cost of the
rounding is measured: the replacement model's KL and the model's own drift (KL of the fp16-rounded model
from the fp32 one) on held-out blocks. Every later load of a released file checks the manifest.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.config import atomic_write_json, atomic_write_text
from training.corpus.build import default_corpus_dir
from training.errors import UserError
from training.evaluate import next_token_kl
from training.fingerprint import file_sha256, model_fingerprint, write_manifest


@dataclass
class ReleaseConfig:
    """Package a pretraining run, its CLT and its located units as models/<name>/."""

    name: str = field(default="", metadata={"help": "release name, e.g. base-balanced"})
    pretrain_run: str = field(default="", metadata={"help": "pretraining run dir (model/, summary.json)"})
    clt_run: str = field(default="", metadata={"help": "CLT run dir (clt/, summary.json)"})
    locate_run: str = field(default="", metadata={"help": "locate_language run dir (located.json)"})
    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()),
        metadata={"help": "the corpus the model was trained on"},
    )
    models_root: str = field(default="models", metadata={"help": "where releases live"})
    eval_blocks: int = field(default=8, metadata={"help": "held-out blocks per language for the fp16 check"})
    replace_reason: str = field(
        default="", metadata={"help": "a release is made once; replacing one needs a measured reason"}
    )


def corpus_fingerprint(corpus_dir: str | Path) -> str:
    """sha256 over the corpus's content — its data files (arrow) and schemas — in a fixed order.

    Each split's state.json is left out: its `_fingerprint` is `datasets`' hash of how the split was
    made, which differs between two builds of the same text (two builds of the default corpus on
    different days gave the same paragraphs and characters per language and different state.json)."""
    import hashlib

    root = Path(corpus_dir)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and (p.suffix == ".arrow" or (p.suffix == ".json" and p.name != "state.json"))
    )
    if not files:
        raise UserError(f"no corpus at {root} (build it with scripts/build_corpus.py)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _required(config: ReleaseConfig) -> None:
    missing = [f for f in ("name", "pretrain_run", "clt_run", "locate_run") if not getattr(config, f)]
    if missing:
        raise UserError("release needs " + ", ".join(f"--{m.replace('_', '-')}" for m in missing))
    for path in (
        Path(config.pretrain_run, "model", "model.safetensors"),
        Path(config.pretrain_run, "summary.json"),
        Path(config.clt_run, "clt", "clt.safetensors"),
        Path(config.clt_run, "summary.json"),
        Path(config.locate_run, "located.json"),
    ):
        if not path.exists():
            raise UserError(f"{path} not found: finish that run before releasing")


@torch.no_grad()
def _fp16_drift(original, released, blocks: torch.Tensor) -> float:
    """Mean KL(fp32 model ‖ fp16-rounded model) per token on `blocks`."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), 16):
        batch = blocks[start : start + 16].long()
        kl = next_token_kl(original(input_ids=batch).logits[:, 1:], released(input_ids=batch).logits[:, 1:])
        total += kl.sum().item()
        count += kl.numel()
    return total / count


def release(config: ReleaseConfig, command: str | None = None) -> Path:
    from clt.evaluate import replacement_metrics
    from clt.export import load_native, save_native
    from clt.train import evaluation_blocks
    from training.models import load_model

    _required(config)
    out = Path(config.models_root) / config.name
    if (out / "MANIFEST.json").exists() and not config.replace_reason:
        raise UserError(
            f"{out} is already released; a replacement needs --replace-reason '<measured reason>'"
        )
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)

    model, tokenizer = load_model(Path(config.pretrain_run, "model"))
    model.half().save_pretrained(staging / "model", safe_serialization=True)
    tokenizer.save_pretrained(staging / "model")
    released_sha = model_fingerprint(staging / "model")

    clt, meta = load_native(Path(config.clt_run, "clt"))
    clt = clt.half()
    save_native(
        clt,
        staging / "clt",
        {
            **{k: v for k, v in meta.items() if k != "clt"},
            "model_dir": f"models/{config.name}/model",
            "model_sha256": released_sha,
            "trained_on_model_sha256": meta.get("model_sha256"),
            "dtype": "float16",
        },
    )
    located = json.loads(Path(config.locate_run, "located.json").read_text())
    located.update(
        model_dir=f"models/{config.name}/model",
        model_sha256=released_sha,
        located_on_model_sha256=located.get("model_sha256"),
    )
    atomic_write_json(staging / "located.json", located)

    # The rounding's cost, measured on the released files against the originals.
    original, _ = load_model(Path(config.pretrain_run, "model"))
    released_model, _ = load_model(staging / "model")
    released_clt, _ = load_native(staging / "clt")
    original_clt, _ = load_native(Path(config.clt_run, "clt"))
    langs = sorted(json.loads(Path(config.pretrain_run, "summary.json").read_text())["mixture"])
    blocks, block_langs = evaluation_blocks(
        config.corpus_dir, tokenizer, langs, min(128, original.config.n_positions), config.eval_blocks
    )
    replacement_released = replacement_metrics(released_model, released_clt.float(), blocks, block_langs)
    replacement_original = replacement_metrics(original, original_clt, blocks, block_langs)

    pretrain_summary = json.loads(Path(config.pretrain_run, "summary.json").read_text())
    clt_summary = json.loads(Path(config.clt_run, "summary.json").read_text())
    metrics = {
        "model": {
            "parameters": pretrain_summary["parameters"],
            "tokens_trained": pretrain_summary["tokens_trained"],
            "validation_nats_per_char": pretrain_summary["validation_nats_per_char"],
            "language_consistency_sampled": pretrain_summary["language_consistency"]["sampled"],
        },
        "clt": {
            "heldout_fvu": clt_summary.get("heldout", {}).get("all", {}).get("fvu"),
            "heldout_never_active_fraction": clt_summary.get("heldout", {})
            .get("all", {})
            .get("never_active_fraction"),
            "heldout_l0": clt_summary.get("heldout", {}).get("all", {}).get("l0"),
            "replacement_kl_trained": clt_summary["replacement"]["all"]["kl"],
        },
        "fp16": {
            "model_kl_fp32_to_fp16": _fp16_drift(original, released_model, blocks),
            "replacement_kl_original": replacement_original["all"]["kl"],
            "replacement_kl_released": replacement_released["all"]["kl"],
            "eval_blocks": len(blocks),
        },
    }
    card = _model_card(config, metrics)
    atomic_write_text(staging / "README.md", card)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    write_manifest(
        out,
        command=command or shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        corpus_sha256=corpus_fingerprint(config.corpus_dir),
        sources={
            "pretrain_run": config.pretrain_run,
            "clt_run": config.clt_run,
            "locate_run": config.locate_run,
        },
        metrics=metrics,
        **({"replace_reason": config.replace_reason} if config.replace_reason else {}),
    )
    return out


def _model_card(config: ReleaseConfig, metrics: dict) -> str:
    model, fp16 = metrics["model"], metrics["fp16"]
    per_lang = sorted(model["validation_nats_per_char"].items())
    nats = ", ".join(f"{lang} {value:.3f}" for lang, value in per_lang)
    return "\n".join(
        [
            f"# {config.name}",
            "",
            "A GPT-2-style model (`GPT2LMHeadModel`, fp16 weights) trained by multilingual-clt on text from",
            "Debian packages, with its cross-layer transcoder (`clt/`) and located language units",
            "(`located.json`). MANIFEST.json lists every file's sha256, the command and the corpus",
            "fingerprint.",
            "",
            f"- parameters: {model['parameters']:,}; tokens trained: {model['tokens_trained']:,}",
            f"- held-out nats/char: {nats}",
            f"- fp16 rounding: KL(fp32 ‖ fp16) {fp16['model_kl_fp32_to_fp16']:.2e} nats/token; replacement "
            f"KL {fp16['replacement_kl_original']:.4f} (fp32) → {fp16['replacement_kl_released']:.4f}",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("models/{config.name}/model")',
            f'tokenizer = AutoTokenizer.from_pretrained("models/{config.name}/model")',
            "```",
            "",
        ]
    )
