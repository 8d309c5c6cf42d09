"""GPT-2-style model presets (Hugging Face `GPT2LMHeadModel`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from training.errors import UserError
from training.fingerprint import in_release, verify_release


@dataclass(frozen=True)
class ModelPreset:
    n_layer: int
    n_embd: int
    n_head: int
    n_ctx: int


PRESETS = {
    # Trains in minutes on 2 CPU cores (~6-7k tokens/s); the project's workhorse for experiments.
    "tiny": ModelPreset(n_layer=4, n_embd=128, n_head=4, n_ctx=128),
    "small": ModelPreset(n_layer=6, n_embd=256, n_head=8, n_ctx=256),
    # The shape the scaling sweep measured as the lowest held-out nats/char reachable in 60 minutes on 2
    # CPU cores (4 × 128: 1.860 vs 6 × 256: 1.957; docs/pretraining.md), with a 1,024-token context so
    # that long-prompt attribution can be measured on it (issue #16).
    "base": ModelPreset(n_layer=4, n_embd=128, n_head=2, n_ctx=1024),
    # GPT-2 small's shape, for GPU users.
    "gpt2": ModelPreset(n_layer=12, n_embd=768, n_head=12, n_ctx=1024),
}


def gpt2_config(
    preset: str,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    dropout: float = 0.0,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    n_ctx: int | None = None,
) -> GPT2Config:
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; presets: {sorted(PRESETS)}")
    base = PRESETS[preset]
    n_embd = n_embd or base.n_embd
    n_head = n_head or base.n_head
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_ctx or base.n_ctx,
        n_embd=n_embd,
        n_layer=n_layer or base.n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


def build_model(config: GPT2Config, seed: int) -> GPT2LMHeadModel:
    import torch

    torch.manual_seed(seed)  # initialisation depends only on the seed
    return GPT2LMHeadModel(config)


def resolve_device(name: str = "auto") -> torch.device:
    """The one device rule: "auto" is CUDA when there is one, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu (or auto)")
    return torch.device(name)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu"):
    """A saved model and its tokenizer, in eval mode: `AutoModelForCausalLM` on safetensors weights only
    (never unpickled), so a user's GPT-2-family directory loads the same way as ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = in_release(model_dir, "model")
    verify_release(path)  # a released model (models/<name>/) must match its MANIFEST.json
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise UserError(
            f"no model at {path}: expected a save_pretrained directory with config.json and "
            "model.safetensors "
            "(train one with scripts/pretrain.py)"
        )
    device = resolve_device(device) if isinstance(device, str) else device
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
