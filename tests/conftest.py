"""Shared fixtures: a small *real* slice of the LibreOffice corpus and a tokenizer trained on it."""

from __future__ import annotations

import os
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
