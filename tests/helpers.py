"""Builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import math

import torch

from clt.model import CLTConfig, CrossLayerTranscoder


def random_clt(n_layers: int, d_model: int, n_features: int = 48, seed: int = 0) -> CrossLayerTranscoder:
    """A random CLT whose features fire on a good share of tokens, with non-trivial scales (so that the
    folding of input/output scales into the weights is exercised). The scales are powers of two, so
    folding them into float32 exports is exact and comparisons with circuit-tracer can be tight."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features))
    with torch.no_grad():
        clt.W_enc.normal_(0, 2 * d_model**-0.5)
        clt.b_enc.normal_(0, 0.2)
        clt.log_threshold.fill_(math.log(0.8))
        for w in clt.W_dec:
            w.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.1)
        clt.input_scale.copy_(2.0 ** (torch.arange(n_layers) % 3 - 1))  # 0.5, 1, 2, 0.5, ...
        clt.output_scale.copy_(2.0 ** (1 - torch.arange(n_layers) % 3))  # 2, 1, 0.5, 2, ...
    return clt.eval()


def tiny_gpt2(tokenizer, seed: int = 0):
    """A randomly initialised 2-layer, 32-wide GPT-2 over `tokenizer` (context 32)."""
    from training.models import build_model, gpt2_config

    config = gpt2_config(
        "tiny",
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_ctx=32,
    )
    return build_model(config, seed=seed)


# A pretraining run small enough for a test: 2 × 32 model, context 32, a few dozen steps on the slice.
MICRO_PRETRAIN = {
    "mixture": "en=0.5,fr=0.25,de=0.25",
    "token_budget": 12000,
    "max_steps": 24,
    "micro_batch": 4,
    "warmup_steps": 4,
    "eval_every": 8,
    "eval_blocks": 4,
    "ckpt_every": 8,
    "log_every": 4,
    "gen_prompts": 3,
    "gen_prompt_tokens": 8,
    "gen_new_tokens": 8,
    "lr": 3e-3,
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_ctx": 32,
}


def micro_base_models(corpus_dir, mixture: str) -> dict:
    """BaseModelsConfig settings (flat flag names) that run every stage in seconds on the corpus slice:
    0.005 minutes of pretraining (30 steps once `calibrate` is pinned to 100 steps/s), a 16-feature CLT,
    location on en, fr, de."""
    from tests.conftest import collect_args

    micro = {key: value for key, value in MICRO_PRETRAIN.items() if key not in ("mixture", "max_steps")}
    collect = collect_args("unused", "unused", corpus_dir)
    return {
        "minutes": 0.005,
        **{f"pretrain_{key}": value for key, value in micro.items()},
        "pretrain_n_ctx": 64,
        "pretrain_vocab_size": 400,
        "pretrain_tokenizer_mixture": mixture,
        "pretrain_tokenizer_chars": 50_000,
        "pretrain_token_budget": 12_000,
        "pretrain_warmup_steps": 4,
        "pretrain_device": "cpu",
        **{
            f"clt_collect_{key}": collect[key]
            for key in ("n_tokens", "n_ctx", "blocks_per_shard", "blocks_per_chunk")
        },
        "clt_collect_mixture": mixture,
        "clt_n_features": 16,
        "clt_max_steps": 20,
        "clt_eval_blocks": 4,
        "clt_device": "cpu",
        "locate_langs": ["en", "fr", "de"],
        "locate_n_ctx": 16,
        "locate_blocks_per_lang": 6,
        "locate_train_texts_per_lang": 60,
        "locate_n_parallel": 8,
        "locate_prompts_per_lang": 3,
        "locate_prompt_tokens": 6,
        "locate_new_tokens": 4,
        "locate_min_frequency": 0.0,
        "locate_max_entropy_bits": 1.6,
        "locate_token_min_count": 1,
        "locate_token_min_share": 0.6,
        "locate_attribution_prompts": 4,
        "locate_linguamap_items": 10,
        "locate_device": "cpu",
    }
