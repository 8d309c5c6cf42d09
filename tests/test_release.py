"""Released models (models/<name>/ with MANIFEST.json): loading verifies every file's sha256."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest
import torch

from clt.export import load_native, save_native
from tests.helpers import random_clt
from training.errors import CorruptData, UserError
from training.fingerprint import model_fingerprint, release_files, write_manifest
from training.models import load_model


@pytest.fixture()
def release(tmp_path, tiny_model_dir):
    root = tmp_path / "models" / "tiny-test"
    shutil.copytree(tiny_model_dir, root / "model")
    model, _ = load_model(root / "model")
    clt = random_clt(model.config.n_layer, model.config.n_embd, n_features=8)
    save_native(
        clt,
        root / "clt",
        {"model_dir": str(root / "model"), "model_sha256": model_fingerprint(root / "model")},
    )
    write_manifest(root, command="pytest fixture", metrics={"note": "test release"})
    return root


def test_release_loads_and_manifest_lists_every_file(release):
    assert sorted(release_files(release)) == sorted(
        p.relative_to(release).as_posix()
        for p in release.rglob("*")
        if p.is_file() and p.name != "MANIFEST.json"
    )
    load_model(release / "model")
    load_native(release / "clt")


@pytest.mark.parametrize("victim", ["model/model.safetensors", "clt/clt.safetensors", "model/config.json"])
def test_tampered_or_missing_file_is_refused(release, victim):
    load_model(release / "model")  # verified once: a later change must still be caught
    path = release / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match=rf"{victim.split('/')[-1]} does not match its sha256"):
        load_model(release / "model")
    with pytest.raises(CorruptData, match="does not match its sha256"):
        load_native(release / "clt")
    path.unlink()
    with pytest.raises(CorruptData, match="missing"):
        load_model(release / "model")


def test_script_refuses_a_tampered_release_in_one_line(release, tmp_path):
    from tests.conftest import PYTHON, REPO, script_env

    (release / "model" / "config.json").write_text((release / "model" / "config.json").read_text() + " ")
    command = [
        PYTHON,
        str(REPO / "scripts" / "eval_clt.py"),
        "--clt",
        str(release / "clt"),
        "--model-dir",
        str(release / "model"),
        "--run-dir",
        str(tmp_path / "eval"),
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "config.json does not match its sha256" in result.stderr


@pytest.fixture()
def finished_runs(tmp_path, tiny_model_dir):
    """A pretraining run, a CLT run and a locate run as the release reads them (the model is the tiny
    random one, the CLT random: what is tested is the packaging and the measured fp16 rounding)."""
    from analysis.located import save_located
    from training.config import atomic_write_json

    pretrain_run, clt_run, locate_run = tmp_path / "pretrain", tmp_path / "clt", tmp_path / "locate"
    shutil.copytree(tiny_model_dir, pretrain_run / "model")
    model, _ = load_model(pretrain_run / "model")
    sha = model_fingerprint(pretrain_run / "model")
    atomic_write_json(
        pretrain_run / "summary.json",
        {
            "mixture": {"en": 0.5, "fr": 0.25, "de": 0.25},
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_trained": 1000,
            "validation_nats_per_char": {"en": 1.5, "fr": 1.6, "de": 1.7},
            "language_consistency": {"sampled": {"en": {"consistent": 0.5}}},
        },
    )
    clt = random_clt(model.config.n_layer, model.config.n_embd, n_features=8)
    save_native(clt, clt_run / "clt", {"model_dir": str(pretrain_run / "model"), "model_sha256": sha})
    atomic_write_json(clt_run / "summary.json", {"replacement": {"all": {"kl": 0.5}}})
    save_located(
        locate_run / "located.json",
        {
            "langs": ["en", "fr"],
            "n_layers": model.config.n_layer,
            "model_dir": str(pretrain_run / "model"),
            "model_sha256": sha,
            "features": {"en": [[0, 1]], "fr": [[1, 2]]},
        },
    )
    return pretrain_run, clt_run, locate_run, sha


def test_release_packages_fp16_repoints_hashes_and_measures_the_rounding(
    tmp_path, finished_runs, real_slice_corpus_dir
):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from analysis.located import load_located
    from clt.export import load_model_and_clt
    from training.release import ReleaseConfig, release

    pretrain_run, clt_run, locate_run, sha = finished_runs
    config = ReleaseConfig(
        name="base-test",
        pretrain_run=str(pretrain_run),
        clt_run=str(clt_run),
        locate_run=str(locate_run),
        corpus_dir=str(real_slice_corpus_dir),
        models_root=str(tmp_path / "models"),
    )
    out = release(config, command="pytest release")
    for weights_file in ("model/model.safetensors", "clt/clt.safetensors"):  # stored fp16, loaded fp32
        with safe_open(str(out / weights_file), "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.n_layer == 2
    # The CLT and the located units point at the released (rounded) weights, keeping the original hash.
    model, tokenizer, clt = load_model_and_clt(out / "model", out / "clt")
    load_model_and_clt(out, out)  # the release's root stands for its model and its CLT
    assert load_located(out, model_dir=out)["model_sha256"] == model_fingerprint(out)
    # ... and the released pair runs in circuit-tracer (tests/test_released_models.py does this for the
    # smallest real release): its replacement model reproduces the model's logits.
    from attribution.circuit_tracer_bridge import circuit_tracer_model
    from clt.export import export_circuit_tracer

    export_circuit_tracer(clt, tmp_path / "ct")
    tokens = torch.tensor([[tokenizer.bos_token_id, 5, 17, 42, 7]])
    with torch.no_grad():
        logits = circuit_tracer_model(model, tokenizer, tmp_path / "ct")(tokens)
        torch.testing.assert_close(logits, model(tokens).logits, rtol=1e-4, atol=1e-4)
    located = load_located(out / "located.json", model_dir=out / "model")
    assert located["located_on_model_sha256"] == sha != located["model_sha256"]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == sorted(release_files(out))
    assert {"clt/clt.safetensors", "located.json", "README.md", "model/tokenizer.json"} <= set(
        manifest["files"]
    )
    assert manifest["command"] == "pytest release" and len(manifest["corpus_sha256"]) == 64
    fp16 = manifest["metrics"]["fp16"]
    assert 0 <= fp16["model_kl_fp32_to_fp16"] < 1e-3
    assert fp16["replacement_kl_released"] == pytest.approx(fp16["replacement_kl_original"], rel=0.05)
    # Released once: a replacement needs a reason, which the manifest then records.
    with pytest.raises(UserError, match="already released"):
        release(config)
    out = release(dataclasses.replace(config, replace_reason="test: measured reason"), command="pytest")
    assert json.loads((out / "MANIFEST.json").read_text())["replace_reason"] == "test: measured reason"


def test_corpus_fingerprint_follows_the_text_not_how_datasets_saved_it(tmp_path):
    from datasets import Dataset, DatasetDict

    from training.release import corpus_fingerprint

    def save(texts, path):
        split = Dataset.from_dict({"text": texts, "lang": ["en"] * len(texts)})
        DatasetDict({"train": split}).save_to_disk(path)
        return path

    first = save(["one paragraph", "another one"], tmp_path / "a")
    state = first / "train" / "state.json"
    fingerprint = corpus_fingerprint(first)
    # Another build of the same text: `datasets` may give it another transform hash.
    record = json.loads(state.read_text())
    record["_fingerprint"] = "0123456789abcdef"
    state.write_text(json.dumps(record))
    assert corpus_fingerprint(first) == fingerprint
    assert corpus_fingerprint(save(["one paragraph", "another one"], tmp_path / "b")) == fingerprint
    assert corpus_fingerprint(save(["one paragraph", "another one."], tmp_path / "c")) != fingerprint
    with pytest.raises(UserError, match="no corpus"):
        corpus_fingerprint(tmp_path / "empty")
