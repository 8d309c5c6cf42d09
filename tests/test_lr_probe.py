"""benchmarks/lr_probe.py: a probe at the reference's own learning rate reproduces the reference run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.test_scaling import micro_config
from training.pretrain import pretrain


def test_probe_at_the_reference_lr_reproduces_it(tmp_path, real_slice_corpus_dir, slice_tokenizer_dir):
    from benchmarks.lr_probe import main

    reference = micro_config(tmp_path / "ref", real_slice_corpus_dir, slice_tokenizer_dir, max_steps=12)
    expected = pretrain(reference)["validation_nats_per_char"]
    main(
        [
            "--run-config", str(tmp_path / "ref" / "config.json"),
            "--lrs", f"{reference.lr},{reference.lr * 3}",
            "--run-dir", str(tmp_path / "probe"),
        ]
    )  # fmt: skip
    same = json.loads((tmp_path / "probe" / f"lr{reference.lr:g}" / "summary.json").read_text())
    assert same["validation_nats_per_char"] == pytest.approx(expected, rel=1e-6)
    other = json.loads((tmp_path / "probe" / f"lr{reference.lr * 3:g}" / "config.json").read_text())
    assert other["lr"] == pytest.approx(reference.lr * 3) and other["branch_from"] is None
    assert dataclasses.asdict(reference)["max_steps"] == other["max_steps"]
    assert "| 0.009 |" in (tmp_path / "probe" / "probes.md").read_text()
