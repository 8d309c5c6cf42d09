"""WSD decay branches and the scaling sweep on the real corpus slice with micro models.

The property that makes the sweep honest: a branch forked from a longer WSD run where a shorter run's
decay starts *is* that shorter run (same weights as training it on its own)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import MICRO_PRETRAIN
from training import scaling
from training.errors import UserError
from training.pretrain import PretrainConfig, pretrain
from training.scaling import SweepConfig, run_sweep


def micro_config(run_dir, corpus_dir, tokenizer_dir, **overrides) -> PretrainConfig:
    """The micro run of test_pretrain as a WSD run of 30 steps (a quarter of it decaying)."""
    config = PretrainConfig(
        run_dir=str(run_dir),
        corpus_dir=str(corpus_dir),
        tokenizer_dir=str(tokenizer_dir),
        **{**MICRO_PRETRAIN, "max_steps": 30, "ckpt_every": 7, "gen_prompts": 2},
        schedule="wsd",
        decay_fraction=0.25,
        device="cpu",
    )
    return dataclasses.replace(config, **overrides)


def test_decay_branch_equals_the_short_run(tmp_path, real_slice_corpus_dir, slice_tokenizer_dir):
    short = micro_config(tmp_path / "short", real_slice_corpus_dir, slice_tokenizer_dir, max_steps=16)
    pretrain(short)
    long = micro_config(tmp_path / "long", real_slice_corpus_dir, slice_tokenizer_dir, max_steps=30)
    paused = pretrain(dataclasses.replace(long, pause_at_step=12))  # 16 - round(0.25 × 16)
    assert paused["paused_at_step"] == 12 and not (tmp_path / "long" / "summary.json").exists()
    branch = dataclasses.replace(short, run_dir=str(tmp_path / "branch"), branch_from=long.run_dir)
    summary = pretrain(branch)
    assert summary["steps"] == 16
    expected = load_file(str(tmp_path / "short" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "branch" / "model" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    # The branch's metrics carry the shared history up to the fork, then its own decay.
    steps = [r["step"] for r in map(json.loads, (tmp_path / "branch" / "metrics.jsonl").open())]
    assert steps[0] <= 5 and max(steps) == 16
    # The long run goes on from its pause to its own end.
    assert pretrain(long)["steps"] == 30


def test_branch_refused_in_one_line_when_the_source_does_not_fit(
    tmp_path, real_slice_corpus_dir, slice_tokenizer_dir
):
    long = micro_config(tmp_path / "long", real_slice_corpus_dir, slice_tokenizer_dir, max_steps=30)
    pretrain(dataclasses.replace(long, pause_at_step=10))
    branch = micro_config(
        tmp_path / "branch",
        real_slice_corpus_dir,
        slice_tokenizer_dir,
        max_steps=16,
        branch_from=long.run_dir,
    )
    with pytest.raises(UserError, match=r"is at step 10, but a 16-step branch forks at step 12"):
        pretrain(branch)
    with pytest.raises(UserError, match=r"lr: 0\.003 → 0\.001"):
        pretrain(dataclasses.replace(branch, run_dir=str(tmp_path / "other-lr"), lr=1e-3))
    with pytest.raises(UserError, match="needs --schedule wsd"):
        pretrain(dataclasses.replace(branch, run_dir=str(tmp_path / "cosine"), schedule="cosine"))


def test_sweep_reads_every_shape_at_every_budget(tmp_path, real_slice_corpus_dir, monkeypatch):
    config = SweepConfig(
        run_dir=str(tmp_path / "sweep"),
        corpus_dir=str(real_slice_corpus_dir),
        shapes=["1x32", "2x32"],
        minutes=[0.01, 0.02],
        head_dim=16,
        mixture="en=0.5,fr=0.25,de=0.25",
        vocab_size=400,
        tokenizer_chars=50_000,
        token_budget=12_000,
        n_ctx=64,  # room for the consistency eval's 16 + 32 tokens
        micro_batch=4,
        warmup_steps=2,
        calibration_steps=5,
        eval_every=1000,
        ckpt_every=1000,
        gen_prompts=2,
        device="cpu",
    )
    # The clock is real but machine-dependent; fix it so the step counts are known: 1x32 runs 30 and 60
    # steps, 2x32 one step at both budgets (a branch forking at step 0 is the short run from scratch).
    micro = scaling.pretrain_config(config, "1x32", 0, 1)
    assert 0 < scaling.calibrate(micro, vocab_size=400, steps=3) < float("inf")
    steps_per_s = {1: 50.0, 2: 1.0}  # by layers: 1x32, 2x32
    monkeypatch.setattr(scaling, "calibrate", lambda run, vocab_size, steps: steps_per_s[run.n_layer])
    results = run_sweep(config)
    reads = {(r["shape"], r["minutes"]): r for r in results["reads"]}
    assert set(reads) == {(s, m) for s in config.shapes for m in config.minutes}
    for (shape, minutes), record in reads.items():
        assert record["steps"] == {("1x32", 0.01): 30, ("1x32", 0.02): 60}.get((shape, minutes), 1)
        assert set(record["nats_per_char"]) == {"en", "fr", "de"}
    assert set(results["best_shape_per_budget"]) == set(config.minutes)
    assert (tmp_path / "sweep" / "scaling.png").stat().st_size > 0
    assert "Best shape per budget" in (tmp_path / "sweep" / "report.md").read_text()
    # Resumed with the same config, nothing is recomputed (and the answer is the same).
    assert run_sweep(config)["reads"] == results["reads"]


def test_a_shape_can_be_capped_below_the_longest_budget():
    config = SweepConfig(shapes=["4x128", "6x384"], minutes=[15, 30, 60], max_minutes=["6x384=30"])
    assert scaling.shape_minutes(config, "4x128") == [15, 30, 60]
    assert scaling.shape_minutes(config, "6x384") == [15, 30]  # its main run ends at 30 min
    for bad in (["6x384"], ["8x512=30"], ["6x384=10"]):
        with pytest.raises(ValueError, match="max-minutes"):
            scaling.shape_minutes(dataclasses.replace(config, max_minutes=bad), "6x384")


def test_learning_rate_scales_with_width_when_asked():
    config = SweepConfig(lr=4e-3)
    assert scaling.pretrain_config(config, "6x256", 15, 10).lr == 4e-3  # default: one lr for every shape
    scaled = dataclasses.replace(config, lr_width=128)
    assert scaling.pretrain_config(scaled, "4x128", 15, 10).lr == pytest.approx(4e-3)
    assert scaling.pretrain_config(scaled, "6x384", 15, 10).lr == pytest.approx(4e-3 / 3)
