"""The base-model driver end to end on the real corpus slice with micro settings: pretraining at a
calibrated budget, CLT, location and release, each an ordinary resumable run directory."""

from __future__ import annotations

import json

from tests.helpers import micro_base_models
from training import base_models
from training.base_models import BaseModelsConfig, run_base_models
from training.config import config_from_dict

MIXTURE = "en=0.5,fr=0.25,de=0.25"


def test_base_models_end_to_end_and_resumed(tmp_path, real_slice_corpus_dir, monkeypatch):
    # The budget is minutes × calibrated steps/s; fix the clock so the step count is known (0.005 min × 60
    # × 100 steps/s = 30 steps).
    monkeypatch.setattr(base_models, "calibrate", lambda config, vocab_size: 100.0)
    values = {
        "runs_dir": str(tmp_path / "base"),
        "mixtures": [MIXTURE],
        "corpus_dir": str(real_slice_corpus_dir),
        "models_root": str(tmp_path / "models"),
        "stages": ["pretrain", "clt", "locate", "release"],
        **micro_base_models(real_slice_corpus_dir, MIXTURE),
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
