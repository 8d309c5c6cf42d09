"""CLT evaluation: reconstruction on held-out stored activations, and the replacement model.

Replacement model: every MLP output of the real model is replaced by the transcoder's reconstruction,
computed layer by layer from the replacement model's own MLP inputs (errors compound through the
layers, as when the CLT stands in for the MLPs in attribution). Compared with the real model on the
same tokens: next-token KL(real ‖ replacement), Δ cross-entropy, and top-1 agreement, overall and per
language.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from clt.model import CrossLayerTranscoder
from clt.recorder import INPUT_HOOK, OUTPUT_HOOK
from clt.store import ActivationStore
from training import hook_points, paths
from training.errors import ModelMismatch
from training.evaluate import next_token_kl


class ReplacementMLPs:
    """Context manager: inside it, `model`'s MLP outputs come from the transcoder (raw scale)."""

    def __init__(self, model, clt: CrossLayerTranscoder):
        self.model, self.clt = model, clt
        points = hook_points.adapter(model)
        if points.n_layers != clt.config.n_layers or points.d_model != clt.config.d_model:
            raise ModelMismatch(
                f"transcoder is for {clt.config.n_layers} layers × {clt.config.d_model}, model has "
                f"{points.n_layers} × {points.d_model}"
            )
        self.acts: list[Tensor] = []
        self.inputs: list[Tensor] = []
        self._mlp_in: dict[int, Tensor] = {}

    def __enter__(self):
        self.acts, self.inputs = [], []
        named = []
        for layer in range(self.clt.config.n_layers):
            named.append((INPUT_HOOK.format(layer=layer), self._read_input(layer)))
            named.append((OUTPUT_HOOK.format(layer=layer), self._replace(layer)))
        self._context = hook_points.hooks(self.model, named)
        self._context.__enter__()
        return self

    def _read_input(self, layer: int):
        def hook(mlp_in):
            self._mlp_in[layer] = mlp_in

        return hook

    def _replace(self, layer: int):
        def hook(output):
            x = self._mlp_in.pop(layer) * self.clt.input_scale[layer]
            if layer == 0:
                self.acts, self.inputs = [], []
            self.inputs.append(x)
            self.acts.append(self.clt.encode_layer(x, layer))
            return self.clt.decode_layer(self.acts, layer, x) / self.clt.output_scale[layer]

        return hook

    def __exit__(self, *exc):
        self._mlp_in.clear()
        return self._context.__exit__(*exc)


@torch.no_grad()
def replacement_metrics(
    model,
    clt: CrossLayerTranscoder,
    blocks: Int[Tensor, "blocks n_ctx"],
    block_langs: list[str],
    batch_size: int = 16,
) -> dict:
    """KL, Δ-CE and top-1 agreement of the replacement model vs the real one (BOS position excluded)."""
    model.eval()
    clt.eval()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].long().to(device)
        langs = block_langs[start : start + batch_size]
        real = model(input_ids=batch).logits[:, 1:-1].float()
        with ReplacementMLPs(model, clt):
            replaced = model(input_ids=batch).logits[:, 1:-1].float()
        targets = batch[:, 2:]
        log_p, log_q = F.log_softmax(real, -1), F.log_softmax(replaced, -1)
        kl = next_token_kl(real, replaced)  # [b, pos]
        ce_real = -log_p.gather(-1, targets[..., None])[..., 0]
        ce_repl = -log_q.gather(-1, targets[..., None])[..., 0]
        agree = (real.argmax(-1) == replaced.argmax(-1)).float()
        for row, lang in enumerate(langs):
            for key in (lang, "all"):
                entry = sums[key]
                entry["kl"] += kl[row].sum().item()
                entry["ce_real"] += ce_real[row].sum().item()
                entry["ce_replacement"] += ce_repl[row].sum().item()
                entry["top1_agreement"] += agree[row].sum().item()
                entry["tokens"] += kl.shape[1]
    report = {}
    for key, entry in sums.items():
        n = entry["tokens"]
        report[key] = {
            "kl": entry["kl"] / n,
            "ce_real": entry["ce_real"] / n,
            "ce_replacement": entry["ce_replacement"] / n,
            "delta_ce": (entry["ce_replacement"] - entry["ce_real"]) / n,
            "top1_agreement": entry["top1_agreement"] / n,
            "tokens": int(n),
        }
    return report


@torch.no_grad()
def store_metrics(
    clt: CrossLayerTranscoder, store: ActivationStore, shards: list[int], batch_size: int = 2048
) -> dict:
    """FVU, L0 and never-active features per layer on stored activations, overall and per language."""
    clt.eval()
    device = clt.b_dec.device
    in_scale, out_scale = clt.input_scale[None, :, None], clt.output_scale[None, :, None]
    residual = defaultdict(lambda: torch.zeros(clt.config.n_layers, dtype=torch.float64))
    sum_y = defaultdict(lambda: torch.zeros(clt.config.n_layers, clt.config.d_model, dtype=torch.float64))
    sum_y2 = defaultdict(lambda: torch.zeros(clt.config.n_layers, dtype=torch.float64))
    l0 = defaultdict(lambda: torch.zeros(clt.config.n_layers, dtype=torch.float64))
    count: dict[str, int] = defaultdict(int)
    ever_active = torch.zeros(clt.config.n_layers, clt.config.n_features, dtype=torch.bool, device=device)
    for shard in shards:
        data = store.read_shard(shard, ("mlp_in", "mlp_out", "lang"))
        for start in range(0, len(data["lang"]), batch_size):
            x = torch.from_numpy(data["mlp_in"][start : start + batch_size]).float().to(device) * in_scale
            y = torch.from_numpy(data["mlp_out"][start : start + batch_size]).float().to(device) * out_scale
            lang_ids = data["lang"][start : start + batch_size]
            y_hat, acts, _ = clt(x)
            ever_active |= (acts > 0).any(0)
            groups = {"all": np.ones(len(lang_ids), dtype=bool)}
            groups.update({store.langs[i]: lang_ids == i for i in np.unique(lang_ids)})
            for key, mask in groups.items():
                m = torch.from_numpy(mask).to(device)
                ys, yh, a = y[m].double(), y_hat[m].double(), acts[m]
                residual[key] += (ys - yh).pow(2).sum(dim=(0, 2)).cpu()
                sum_y[key] += ys.sum(0).cpu()
                sum_y2[key] += ys.pow(2).sum(dim=(0, 2)).cpu()
                l0[key] += (a > 0).sum(dim=(0, 2)).double().cpu()
                count[key] += int(m.sum())
    report = {}
    for key in count:
        n = count[key]
        variance = sum_y2[key] - sum_y[key].pow(2).sum(-1) / n
        fvu = (residual[key] / variance).tolist()
        report[key] = {
            "fvu": fvu,
            "mean_fvu": float(np.mean(fvu)),
            "l0": (l0[key] / n).tolist(),
            "mean_l0": float((l0[key] / n).mean()),
            "tokens": n,
        }
    report["all"]["never_active_fraction"] = (~ever_active).float().mean(1).tolist()
    return report


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
    run_dir: str | None = field(
        default=None, metadata={"help": "run directory for config.json + summary.json (optional)"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def evaluate_clt(config: EvalConfig) -> dict:
    """Held-out reconstruction (with a store) and replacement-model metrics of a saved transcoder."""
    from clt.export import load_model_and_clt
    from clt.train import evaluation_blocks
    from training.config import RunDir, atomic_write_json
    from training.corpus.build import default_corpus_dir, load_corpus
    from training.fingerprint import model_fingerprint

    run = RunDir.open(config.run_dir, config) if config.run_dir else None
    model, tokenizer, clt = load_model_and_clt(
        config.model_dir, config.clt, config.device, allow_model_mismatch=True
    )
    trained_on = json.loads((Path(config.clt) / "config.json").read_text()).get("model_sha256")
    if trained_on and trained_on != model_fingerprint(config.model_dir):
        print(
            f"warning: {config.clt} was trained on other weights than {config.model_dir}'s "
            "(expected when diffing a fine-tuned model; reconstruction will be worse)"
        )
    report: dict = {}
    langs = None
    if config.store:
        store = ActivationStore(config.store)
        report["heldout"] = store_metrics(clt, store, config.shards or store.done_shards[-1:])
        langs = store.langs
    langs = langs or sorted(set(load_corpus(config.corpus_dir or default_corpus_dir())["validation"]["lang"]))
    blocks, block_langs = evaluation_blocks(
        config.corpus_dir, tokenizer, langs, config.n_ctx, config.eval_blocks
    )
    with torch.no_grad():
        report["replacement"] = replacement_metrics(model, clt, blocks.to(model.device), block_langs)
    if run is not None:
        atomic_write_json(run.path / "summary.json", report)
    return report


def summary_row(report: dict) -> dict:
    """The headline numbers of a `train_clt` summary: held-out FVU, L0 and never-active features (per
    layer and mean), the replacement model's KL (all tokens and per language) / ΔCE / top-1 agreement,
    dead features during training."""
    held, replacement = report["heldout"]["all"], report["replacement"]["all"]
    never = held["never_active_fraction"]
    return {
        "mean_fvu": held["mean_fvu"],
        "fvu": held["fvu"],
        "mean_l0": held["mean_l0"],
        "l0": held["l0"],
        "kl": replacement["kl"],
        "kl_per_language": {
            lang: r["kl"] for lang, r in report["replacement"].items() if lang != "all" and "kl" in r
        },
        "delta_ce": replacement["delta_ce"],
        "top1": replacement["top1_agreement"],
        "dead": sum(report["dead_fraction_per_layer"]) / len(report["dead_fraction_per_layer"]),
        "never_active": sum(never) / len(never),
        "never_active_per_layer": never,
        "steps": report["steps"],
    }
