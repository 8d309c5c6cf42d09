"""Shared fixtures: a small *real* slice of the LibreOffice corpus and a tokenizer trained on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLICE_LANGS = ["en", "fr", "de"]


@pytest.fixture(scope="session")
def real_slice_corpus_dir(tmp_path_factory) -> Path:
    """en/fr/de paragraphs from one folder of the help (`shared/optionen`), fetched from Debian once per
    machine into the normal cache, built into a DatasetDict in a temp dir."""
    from training.corpus.build import CorpusConfig, build_corpus

    out = tmp_path_factory.mktemp("corpus") / "slice"
    build_corpus(CorpusConfig(out_dir=str(out), langs=SLICE_LANGS, libreoffice_subdirs=["shared/optionen"],
                              n_parallel=40, val_fraction=0.1, workers=1))
    return out


@pytest.fixture(scope="session")
def slice_tokenizer_dir(real_slice_corpus_dir, tmp_path_factory) -> Path:
    from training.corpus.build import load_corpus
    from training.tokenizer import train_bpe_tokenizer

    corpus = load_corpus(real_slice_corpus_dir)
    tokenizer = train_bpe_tokenizer(list(corpus["train"]["text"]), vocab_size=512)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


def script_env() -> dict:
    """Environment for running the project's scripts in subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable


def run_torchrun(script: str, args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port, no collisions with other jobs) on a project script.

    If it does not finish in time, every process in its session gets SIGABRT with faulthandler on, so
    the failure shows each rank's Python stack instead of a bare timeout.
    """
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(REPO / "scripts" / script)] + args
    env = {**script_env(), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        stdout, stderr = process.communicate(timeout=60)
        raise AssertionError(f"torchrun {script} hung for {timeout} s; stacks:\n{stderr[-8000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, stderr[-3000:]
    return result


def kill_when(process, progress, threshold: int, timeout: float = 240) -> int:
    """SIGKILL `process` as soon as `progress()` (e.g. the last checkpoint's step) reaches `threshold`.

    Returns the progress at the kill; fails the test if the process ended first, since then nothing
    about resuming would have been tested."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        reached = progress()
        if reached >= threshold:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            assert process.returncode == -signal.SIGKILL
            return reached
        time.sleep(0.005)
    process.kill()
    raise AssertionError(f"the process ended (or timed out) before reaching {threshold}: nothing was killed")


def checkpoint_step(run_dir: Path) -> int:
    import json

    try:
        return json.loads((Path(run_dir) / "checkpoint" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.fixture(scope="session")
def tiny_model_dir(slice_tokenizer_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, 32-wide GPT-2 with the slice tokenizer (for fast CLT tests)."""
    import torch
    from transformers import AutoTokenizer

    from training.models import build_model, gpt2_config

    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    config = gpt2_config("tiny", len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         n_layer=2, n_embd=32, n_head=2, n_ctx=32)
    model = build_model(config, seed=0)
    with torch.no_grad():  # larger random MLP weights: activations with some structure to reconstruct
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(5)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def collect_args(model_dir, store, corpus_dir) -> dict:
    return {"model_dir": str(model_dir), "store": str(store), "corpus_dir": str(corpus_dir),
            "mixture": "en=0.5,fr=0.25,de=0.25", "n_tokens": 3000, "n_ctx": 16, "blocks_per_shard": 16,
            "blocks_per_chunk": 4, "batch_size": 16}


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dir, real_slice_corpus_dir, tmp_path_factory):
    from clt.activations import CollectConfig, collect_activations

    store = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    return collect_activations(CollectConfig(**collect_args(tiny_model_dir, store, real_slice_corpus_dir)))
