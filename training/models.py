"""GPT-2-style model presets (Hugging Face `GPT2LMHeadModel`)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GPT2Config, GPT2LMHeadModel


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
    # GPT-2 small's shape, for GPU users.
    "gpt2": ModelPreset(n_layer=12, n_embd=768, n_head=12, n_ctx=1024),
}


def gpt2_config(preset: str, vocab_size: int, bos_token_id: int, eos_token_id: int, dropout: float = 0.0,
                n_layer: int | None = None, n_embd: int | None = None, n_head: int | None = None,
                n_ctx: int | None = None) -> GPT2Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {sorted(PRESETS)}")
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
