"""The base-model driver end to end on the real corpus slice with micro settings: pretraining at a
calibrated budget, CLT, location and release, each an ordinary resumable run directory."""

from __future__ import annotations

import json

import pytest

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


def test_a_later_model_joins_released_ones_with_their_steps_and_tokenizer(
    tmp_path, real_slice_corpus_dir, slice_tokenizer_dir, monkeypatch
):
    # A model trained on another machine must match the released ones: the step count is given (no
    # calibration on this machine's clock) and the vocabulary is the released tokenizer's, not a new one.
    from transformers import AutoTokenizer

    from training.errors import UserError

    def no_clock(config, vocab_size):
        raise AssertionError("--steps must not calibrate")

    monkeypatch.setattr(base_models, "calibrate", no_clock)
    settings = micro_base_models(real_slice_corpus_dir, MIXTURE)
    # A 512-token tokenizer of the whole slice, not the 400-token one of MIXTURE the run would train.
    released = slice_tokenizer_dir
    values = {
        "runs_dir": str(tmp_path / "base"),
        "mixtures": [MIXTURE],
        "corpus_dir": str(real_slice_corpus_dir),
        "stages": ["pretrain"],
        **settings,
        "steps": 12,
        "tokenizer_dir": str(released),
    }
    done = run_base_models(config_from_dict(BaseModelsConfig, values))[MIXTURE]
    assert done["pretrain"]["steps"] == 12
    assert not (tmp_path / "base" / "tokenizer").exists()
    model_dir = tmp_path / "base" / MIXTURE / "pretrain" / "model"
    ours, theirs = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(released)
    assert ours.get_vocab() == theirs.get_vocab()

    values["runs_dir"], values["tokenizer_dir"] = str(tmp_path / "other"), str(tmp_path / "nothing-here")
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        run_base_models(config_from_dict(BaseModelsConfig, values))
