"""Released models (models/<name>/ with MANIFEST.json): loading verifies every file's sha256."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from clt.export import load_native, save_native
from tests.helpers import random_clt
from training.errors import CorruptData
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
