"""Save and export transcoders.

- Native format (`save_native` / `load_native`): `config.json` + `clt.safetensors` holding the training
  weights on the normalised scale and the scales themselves — exact round trip, resumable analyses.
- `folded_weights`: the same transcoder acting on *raw* activations. With s_in, s_out the per-layer
  scales, training computes a = act(s_in·x W_enc + b_enc) and ŷ_raw = (Σ a W_dec + b_dec) / s_out, so
  W_enc ← s_in·W_enc, W_dec^{l→k} ← W_dec^{l→k}/s_out^k, b_dec ← b_dec/s_out, W_skip^k ←
  (s_in^k/s_out^k)·W_skip^k;
  b_enc and the thresholds act on pre-activations, which are unchanged.
- circuit-tracer: a CLT directory (`model_kind: cross_layer_transcoder`, `W_enc_{i}` / `W_dec_{i}`
  safetensors) or, for a PLT, a `transcoder_set` (`layer_{i}.safetensors`).
- sae-lens: one directory per layer (`cfg.json` + `sae_weights.safetensors`) for per-layer transcoders.
Hook names are TransformerLens's, which circuit-tracer and sae-lens use: the MLP input is
`blocks.{l}.ln2.hook_normalized`, the output `blocks.{l}.hook_mlp_out`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clt.model import CLTConfig, CrossLayerTranscoder
from training import paths
from training.config import atomic_write_json
from training.errors import ModelMismatch, UserError
from training.fingerprint import in_release, verify_release

NATIVE_WEIGHTS = "clt.safetensors"
TL_INPUT_HOOK = "ln2.hook_normalized"
TL_OUTPUT_HOOK = "hook_mlp_out"
SAE_LENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write (sae-lens ≥ 6)


def save_native(clt: CrossLayerTranscoder, out_dir: str | Path, metadata: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu().contiguous() for name, value in clt.state_dict().items()}
    save_file(tensors, str(out_dir / NATIVE_WEIGHTS))
    atomic_write_json(out_dir / "config.json", {"clt": clt.config.to_dict(), **(metadata or {})})
    return out_dir


def load_native(path: str | Path, device: str | torch.device = "cpu") -> tuple[CrossLayerTranscoder, dict]:
    path = in_release(path, "clt")
    if not (path / NATIVE_WEIGHTS).exists():
        raise UserError(
            f"no transcoder at {path} (expected {NATIVE_WEIGHTS} and config.json; train one with "
            "scripts/train_clt.py)"
        )
    verify_release(path)  # a released CLT (models/<name>/clt) must match its MANIFEST.json
    meta = json.loads((path / "config.json").read_text())
    clt = CrossLayerTranscoder(CLTConfig(**meta["clt"]))
    missing, unexpected = clt.load_state_dict(load_file(str(path / NATIVE_WEIGHTS)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return clt.to(device).eval(), meta


def load_model_and_clt(
    model_dir: str | Path,
    clt_dir: str | Path,
    device: str | torch.device = "cpu",
    allow_model_mismatch: bool = False,
):
    """The one loader: the model + tokenizer (`training.models.load_model`) and the native CLT, checked
    against each other (shape, and the weights' sha256 unless `allow_model_mismatch`, e.g. to look at a
    fine-tuned model through the base model's CLT)."""
    from training.models import load_model

    model, tokenizer = load_model(model_dir, device)
    clt, meta = load_native(clt_dir, device=model.device)
    check_matches_model(meta, model, None if allow_model_mismatch else model_dir)
    return model, tokenizer, clt


def check_matches_model(meta: dict, model, model_dir: str | Path | None = None) -> None:
    """Fail early if a transcoder is used with a model of another shape, or (given the model's
    directory) with other weights than it was trained on."""
    cfg = meta["clt"]
    if (cfg["n_layers"], cfg["d_model"]) != (model.config.n_layer, model.config.n_embd):
        raise ModelMismatch(
            f"transcoder expects {cfg['n_layers']} layers × {cfg['d_model']}, the model has "
            f"{model.config.n_layer} × {model.config.n_embd}"
        )
    if model_dir is not None and meta.get("model_sha256"):
        from training.fingerprint import model_fingerprint

        if model_fingerprint(model_dir) != meta["model_sha256"]:
            raise ModelMismatch(
                f"the transcoder was trained on {meta.get('model_dir')} (sha256 "
                f"{meta['model_sha256'][:12]}…), "
                f"whose weights differ from {model_dir}'s; pass the matching model"
            )


@torch.no_grad()
def folded_weights(clt: CrossLayerTranscoder) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    s_in, s_out = clt.input_scale.detach().cpu(), clt.output_scale.detach().cpu()
    L = clt.config.n_layers
    W_dec = []
    for layer in range(L):
        targets = torch.arange(layer, layer + clt.n_targets(layer))
        W_dec.append(clt.W_dec[layer].detach().cpu() / s_out[targets][None, :, None])
    threshold = (
        clt.threshold.detach().cpu()
        if clt.config.activation == "jumprelu"
        else clt.batchtopk_threshold.detach().cpu()[:, None].expand(L, clt.config.n_features).clone()
    )
    folded = {
        "W_enc": clt.W_enc.detach().cpu() * s_in[:, None, None],
        "b_enc": clt.b_enc.detach().cpu().clone(),
        "threshold": threshold,
        "W_dec": W_dec,
        "b_dec": clt.b_dec.detach().cpu() / s_out[:, None],
    }
    if clt.W_skip is not None:
        folded["W_skip"] = clt.W_skip.detach().cpu() * (s_in / s_out)[:, None, None]
    return folded


class NotExportable(UserError):
    """The target format cannot represent this transcoder (e.g. TopK for circuit-tracer)."""


def _check_exportable(clt: CrossLayerTranscoder, target: str) -> bool:
    """Returns whether the export carries a threshold (JumpReLU semantics) or is a plain ReLU."""
    activation = clt.config.activation
    if activation == "topk":
        raise NotExportable(
            f"{target} has no TopK transcoders; train with --activation jumprelu or batchtopk "
            "(BatchTopK exports as JumpReLU with its inference threshold)"
        )
    return activation in ("jumprelu", "batchtopk")


def export_circuit_tracer(
    clt: CrossLayerTranscoder, out_dir: str | Path, scan: str = "multilingual-clt"
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholded = _check_exportable(clt, "circuit-tracer")
    if clt.config.cross_layer and clt.W_skip is not None:
        raise NotExportable(
            "circuit-tracer's CLT loader has no skip connection; export a per-layer transcoder with skip"
        )
    weights = folded_weights(clt)
    L = clt.config.n_layers
    if clt.config.cross_layer:
        for i in range(L):
            encoder = {
                f"W_enc_{i}": weights["W_enc"][i].T.contiguous(),
                f"b_enc_{i}": weights["b_enc"][i],
                f"b_dec_{i}": weights["b_dec"][i],
            }
            if thresholded:
                encoder[f"threshold_{i}"] = weights["threshold"][i].contiguous()
            save_file(encoder, str(out_dir / f"W_enc_{i}.safetensors"))
            save_file(
                {f"W_dec_{i}": weights["W_dec"][i].contiguous()}, str(out_dir / f"W_dec_{i}.safetensors")
            )
        config = {"model_kind": "cross_layer_transcoder"}
    else:
        for i in range(L):
            layer = {
                "W_enc": weights["W_enc"][i].T.contiguous(),
                "W_dec": weights["W_dec"][i][:, 0].contiguous(),
                "b_enc": weights["b_enc"][i],
                "b_dec": weights["b_dec"][i],
            }
            if thresholded:
                layer["activation_function.threshold"] = weights["threshold"][i].contiguous()
            if clt.W_skip is not None:
                layer["W_skip"] = weights["W_skip"][i].T.contiguous()  # circuit-tracer computes x @ W_skip.T
            save_file(layer, str(out_dir / f"layer_{i}.safetensors"))
        config = {"model_kind": "transcoder_set", "transcoders": [f"layer_{i}.safetensors" for i in range(L)]}
    config.update({"feature_input_hook": TL_INPUT_HOOK, "feature_output_hook": TL_OUTPUT_HOOK, "scan": scan})
    # config.yaml as plain YAML (a flat mapping and one list): no YAML library needed to write it.
    lines = []
    for key, value in config.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {item}" for item in value]
        else:
            lines.append(f"{key}: {value}")
    (out_dir / "config.yaml").write_text("\n".join(lines) + "\n")
    return out_dir


def export_sae_lens(
    clt: CrossLayerTranscoder, out_dir: str | Path, model_name: str = "multilingual-clt"
) -> list[Path]:
    """One sae-lens transcoder directory per layer (`layer_{i}/cfg.json` + `sae_weights.safetensors`)."""
    if clt.config.cross_layer:
        raise NotExportable(
            "sae-lens holds per-layer transcoders only: train with --cross-layer false, or use the "
            "circuit-tracer export for cross-layer transcoders"
        )
    thresholded = _check_exportable(clt, "sae-lens")
    weights = folded_weights(clt)
    skip = clt.W_skip is not None
    architecture = {
        (True, False): "jumprelu_transcoder",
        (True, True): "jumprelu_skip_transcoder",
        (False, False): "transcoder",
        (False, True): "skip_transcoder",
    }[(thresholded, skip)]
    paths = []
    for i in range(clt.config.n_layers):
        layer_dir = Path(out_dir) / f"layer_{i}"
        layer_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            "W_enc": weights["W_enc"][i].contiguous(),
            "b_enc": weights["b_enc"][i],
            "W_dec": weights["W_dec"][i][:, 0].contiguous(),
            "b_dec": weights["b_dec"][i],
        }
        if thresholded:
            tensors["threshold"] = weights["threshold"][i].contiguous()
        if skip:
            tensors["W_skip"] = weights["W_skip"][i].T.contiguous()  # sae-lens computes W_skip @ x
        save_file(tensors, str(layer_dir / "sae_weights.safetensors"))
        cfg = {
            "architecture": architecture,
            "d_in": clt.config.d_model,
            "d_sae": clt.config.n_features,
            "d_out": clt.config.d_model,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # sae-lens reads `metadata` as its 6.x layout only when a 6.x version is named there.
            "metadata": {
                "sae_lens_version": SAE_LENS_FORMAT_VERSION,
                "model_name": model_name,
                "hook_name": f"blocks.{i}.{TL_INPUT_HOOK}",
                "hook_name_out": f"blocks.{i}.{TL_OUTPUT_HOOK}",
                "prepend_bos": True,
            },
        }
        (layer_dir / "cfg.json").write_text(json.dumps(cfg, indent=2))
        paths.append(layer_dir)
    return paths


@dataclass
class ExportConfig:
    """Export a transcoder saved by train_clt.py for circuit-tracer or sae-lens."""

    clt: str = field(default=paths.CLT_DIR, metadata={"help": "transcoder directory (native format)"})
    format: str = field(default="circuit-tracer", metadata={"help": "circuit-tracer or sae-lens"})
    run_dir: str = field(
        default="runs/clt-export", metadata={"help": "run directory; the export goes to its <format>/ folder"}
    )


def export(config: ExportConfig) -> list[Path]:
    """Write the export into `run_dir/circuit_tracer` or `run_dir/sae_lens`; returns the written paths."""
    from training.config import RunDir

    if config.format not in ("circuit-tracer", "sae-lens"):
        raise UserError(f"unknown format {config.format!r}: circuit-tracer or sae-lens")
    run = RunDir.open(config.run_dir, config)
    clt, _ = load_native(config.clt)
    if config.format == "circuit-tracer":
        return [export_circuit_tracer(clt, run.path / "circuit_tracer")]
    return export_sae_lens(clt, run.path / "sae_lens")
