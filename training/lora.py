"""LoRA adapters on a GPT-2 model with peft, and merging them back into a plain HF model.

GPT-2's projections are `Conv1D` modules that store weights as [in, out], hence `fan_in_fan_out=True`.
After training the adapters are merged (`merge_and_unload`), so a LoRA run saves an ordinary
`GPT2LMHeadModel` directory that every other tool in the project (CLT, attribution, diffing) reads.
"""

from __future__ import annotations

import torch

LORA_MODULES = ("c_attn", "c_proj", "c_fc")  # attention qkv, attention and MLP output, MLP input


def add_lora(
    model, rank: int, alpha: float, dropout: float = 0.0, layers: list[int] | None = None, seed: int = 0
):
    """Wrap `model` with LoRA adapters (base weights frozen by peft); `layers` limits them to some blocks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' A matrices are random
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_MODULES),
        fan_in_fan_out=True,
        layers_to_transform=layers,
        bias="none",
    )
    return get_peft_model(model, config)


def lora_count(peft_model) -> dict:
    """Adapter parameters vs the base model's parameters (the share is relative to the base model)."""
    trainable = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    total = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" not in name)
    return {"trainable": trainable, "total": total, "share": trainable / total}


def merge_lora(peft_model):
    """The base model with the adapters folded into its weights."""
    return peft_model.merge_and_unload()
