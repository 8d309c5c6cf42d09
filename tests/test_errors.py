"""User mistakes fail early with one line that says what to fix (training/errors.py)."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import pytest
import torch

from training.errors import CorruptData, UnknownLanguage, UserError


def test_unknown_language_names_the_languages_there_and_how_to_add_one(real_slice_corpus_dir, tmp_path):
    from interventions.sweep import SteerConfig, run_steering

    config = SteerConfig(
        corpus_dir=str(real_slice_corpus_dir),
        source="fr",
        target="xx",
        run_dir=str(tmp_path / "r"),
        model_dir=str(tmp_path / "no-model"),
    )  # the language check comes before any loading
    with pytest.raises(UnknownLanguage) as error:
        run_steering(config)
    message = str(error.value)
    assert (
        "['xx']" in message
        and "it has de, en, fr" in message
        and "build_corpus.py --langs de,en,fr,xx" in message
    )


def test_steer_script_prints_the_unknown_language_in_one_line(real_slice_corpus_dir, tmp_path):
    from tests.conftest import PYTHON, REPO, script_env

    command = [
        PYTHON,
        str(REPO / "scripts" / "steer.py"),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--from",
        "fr",
        "--to",
        "xx",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no text in ['xx']" in result.stderr


def test_corrupt_shard_names_the_shard_and_the_command_that_recollects(tiny_store, tmp_path):
    from clt.store import ActivationStore

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store.url, copy)
    shard_file = copy / "mlp_in" / "c" / "2" / "0" / "0"
    assert shard_file.exists()
    data = bytearray(shard_file.read_bytes())
    shard_file.write_bytes(bytes(data[: len(data) // 2]))  # truncated, as after a full disk
    store = ActivationStore(copy)
    store.read_shard(1)  # other shards still read
    with pytest.raises(CorruptData, match=r"shard 2 of .*copy.zarr cannot be read .*collect_activations.py"):
        store.read_shard(2)


def test_long_prompt_is_cut_with_a_warning_and_context_overflow_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from attribution.pipeline import prompt_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Click OK to close the dialog " * 20
    n = 1 + len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.warns(
        UserWarning, match=rf"prompt of {n} tokens .* cut to its first 16: {n - 16} tokens dropped"
    ):
        tokens = prompt_tokens(tokenizer, text, max_tokens=16, n_ctx=32)
    assert len(tokens) == 16 and tokens[0] == tokenizer.bos_token_id
    with pytest.raises(UserError, match="exceeds the model's context of 32 tokens"):
        prompt_tokens(tokenizer, text, max_tokens=64, n_ctx=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits is not cut and not warned about
        assert torch.equal(
            prompt_tokens(tokenizer, "Click OK", max_tokens=16, n_ctx=32)[1:],
            torch.tensor(tokenizer("Click OK", add_special_tokens=False)["input_ids"]),
        )
