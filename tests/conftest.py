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
    build_corpus(
        CorpusConfig(
            corpus_dir=str(out),
            langs=SLICE_LANGS,
            sources=["libreoffice"],
            libreoffice_subdirs=["shared/optionen"],
            n_parallel=40,
            val_fraction=0.1,
            workers=1,
        )
    )
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


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc). torchrun starts each rank in a session of its own,
    so signalling torchrun's process group does not reach the ranks: the tree must be walked."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_torchrun(
    script: str, args: list[str], nproc: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port, no collisions with other jobs) on a project script.

    If it does not finish in time, every rank (and torchrun) gets SIGABRT with faulthandler on, so the
    failure shows each rank's Python stack; then the whole tree is killed, so nothing outlives the test.
    After a normal exit no process of the tree may survive either.
    """
    import tempfile
    import time

    command = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(REPO / "scripts" / script),
    ] + args
    env = {**script_env(), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=err, text=True, start_new_session=True
        )
        # Ranks that outlive torchrun are re-parented away from it: remember every process seen in the tree.
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            seen.update(descendants(process.pid))
            time.sleep(0.2)
        hung = process.poll() is None
        if hung:
            tree = descendants(process.pid)
            _signal_all(
                tree, signal.SIGABRT
            )  # ranks first: faulthandler prints their stacks to torchrun's stderr
            time.sleep(5)
            _signal_all(tree + [process.pid], signal.SIGKILL)
            process.wait(timeout=60)
        survivors = [pid for pid in seen if Path(f"/proc/{pid}").exists() and _is_ours(pid, script)]
        _signal_all(survivors, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        raise AssertionError(
            f"torchrun {script} hung for {timeout} s; every rank's stack:\n{stderr[-12000:]}"
        )
    assert not survivors, f"torchrun {script} exited but left processes behind: {survivors}\n{stderr[-3000:]}"
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, stderr[-3000:]
    return result


def _is_ours(pid: int, script: str) -> bool:
    """Whether `pid` still runs our script (a pid may have been reused by an unrelated process)."""
    try:
        return script in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


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

    from tests.helpers import tiny_gpt2

    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer, seed=0)
    with torch.no_grad():  # larger random MLP weights: activations with some structure to reconstruct
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(5)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def collect_args(model_dir, store, corpus_dir) -> dict:
    return {
        "model_dir": str(model_dir),
        "store": str(store),
        "corpus_dir": str(corpus_dir),
        "mixture": "en=0.5,fr=0.25,de=0.25",
        "n_tokens": 3000,
        "n_ctx": 16,
        "blocks_per_shard": 16,
        "blocks_per_chunk": 4,
        "batch_size": 16,
    }


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dir, real_slice_corpus_dir, tmp_path_factory):
    from clt.activations import CollectConfig, collect_activations

    store = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    return collect_activations(CollectConfig(**collect_args(tiny_model_dir, store, real_slice_corpus_dir)))
