"""The released models under models/: each loads in AutoModelForCausalLM and passes its manifest; the
smallest one's CLT loads into circuit-tracer and its replacement model reproduces the model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RELEASES = sorted(p.parent for p in (REPO / "models").glob("*/MANIFEST.json"))


def _size(release: Path) -> int:
    return sum(p.stat().st_size for p in release.rglob("*") if p.is_file())


def test_releases_fit_the_size_limit():
    assert sum(_size(release) for release in RELEASES) <= 200 * 1024**2


@pytest.mark.skipif(not RELEASES, reason="no model released under models/ yet")
@pytest.mark.parametrize("release", RELEASES, ids=[r.name for r in RELEASES])
def test_release_loads_in_transformers_and_with_its_clt(release):
    from transformers import AutoModelForCausalLM

    from analysis.located import load_located
    from clt.export import load_model_and_clt

    model = AutoModelForCausalLM.from_pretrained(release / "model", use_safetensors=True)
    _, _, clt = load_model_and_clt(release / "model", release / "clt")  # verifies the manifest
    assert clt.config.n_layers == model.config.n_layer
    load_located(release / "located.json", model=model, model_dir=release / "model")
    manifest = json.loads((release / "MANIFEST.json").read_text())
    assert manifest["command"] and len(manifest["corpus_sha256"]) == 64


@pytest.mark.skipif(not RELEASES, reason="no model released under models/ yet")
def test_smallest_release_clt_runs_in_circuit_tracer(tmp_path):
    from attribution.circuit_tracer_bridge import circuit_tracer_model
    from clt.export import export_circuit_tracer, load_model_and_clt

    smallest = min(RELEASES, key=_size)
    model, tokenizer, clt = load_model_and_clt(smallest / "model", smallest / "clt")
    export_circuit_tracer(clt, tmp_path / "clt")
    replacement = circuit_tracer_model(model, tokenizer, tmp_path / "clt")
    tokens = torch.tensor(tokenizer("Le chat dort sur le canapé.")["input_ids"])
    tokens = torch.cat([torch.tensor([tokenizer.bos_token_id]), tokens])
    with torch.no_grad():
        torch.testing.assert_close(
            replacement(tokens[None])[0], model(tokens[None]).logits[0], rtol=1e-4, atol=1e-4
        )
