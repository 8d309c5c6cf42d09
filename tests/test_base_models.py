"""The base-model driver end to end on the real corpus slice with micro settings: pretraining at a
calibrated budget, CLT, location and release, each an ordinary resumable run directory."""

from __future__ import annotations

import json

from tests.conftest import collect_args
from tests.helpers import MICRO_PRETRAIN
from training import base_models
from training.base_models import BaseModelsConfig, run_base_models
from training.config import config_from_dict

MIXTURE = "en=0.5,fr=0.25,de=0.25"


def test_base_models_end_to_end_and_resumed(tmp_path, real_slice_corpus_dir, monkeypatch):
    # The budget is minutes × calibrated steps/s; fix the clock so the step count is known (0.005 min × 60
    # × 100 steps/s = 30 steps).
    monkeypatch.setattr(base_models, "calibrate", lambda config, vocab_size: 100.0)
    micro = {key: value for key, value in MICRO_PRETRAIN.items() if key not in ("mixture", "max_steps")}
    collect = collect_args("unused", "unused", real_slice_corpus_dir)
    values = {
        "runs_dir": str(tmp_path / "base"),
        "mixtures": [MIXTURE],
        "corpus_dir": str(real_slice_corpus_dir),
        "minutes": 0.005,
        "models_root": str(tmp_path / "models"),
        "stages": ["pretrain", "clt", "locate", "release"],
        **{f"pretrain_{key}": value for key, value in micro.items()},
        "pretrain_n_ctx": 64,
        "pretrain_vocab_size": 400,
        "pretrain_tokenizer_mixture": MIXTURE,
        "pretrain_tokenizer_chars": 50_000,
        "pretrain_token_budget": 12_000,
        "pretrain_warmup_steps": 4,
        "pretrain_device": "cpu",
        **{
            f"clt_collect_{key}": collect[key]
            for key in ("n_tokens", "n_ctx", "blocks_per_shard", "blocks_per_chunk")
        },
        "clt_collect_mixture": MIXTURE,
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
    config = config_from_dict(BaseModelsConfig, values)
    results = run_base_models(config)
    done = results[MIXTURE]
    assert done["pretrain"]["steps"] == 30 and done["clt"]["steps"] == 20
    release = tmp_path / "models" / f"base-{MIXTURE}"
    assert done["release"] == str(release)
    manifest = json.loads((release / "MANIFEST.json").read_text())
    assert {"model/model.safetensors", "clt/clt.safetensors", "located.json"} <= set(manifest["files"])

    from clt.export import load_model_and_clt

    load_model_and_clt(release / "model", release / "clt")
    # Every mixture shares one tokenizer, trained once.
    assert (tmp_path / "base" / "tokenizer" / "tokenizer.json").exists()
    # Resumed: each stage finds its finished run; the release is not made twice.
    again = run_base_models(config)[MIXTURE]
    assert again["pretrain"] == done["pretrain"] and "release" not in again
