"""Pretraining on the real corpus slice with a very small model: outputs, exact resume after a real kill,
and DDP on 2 CPU processes (gloo) matching single-process gradient accumulation."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import PYTHON, REPO, checkpoint_step, kill_when, run_torchrun, script_env
from tests.helpers import MICRO_PRETRAIN
from training.config import config_to_dict
from training.loop import learning_rate
from training.models import PRESETS as MODEL_PRESETS
from training.pretrain import PretrainConfig, pretrain


def micro_args(run_dir, corpus_dir, tokenizer_dir, **overrides) -> list[str]:
    args = {"run_dir": run_dir, "corpus_dir": corpus_dir, "tokenizer_dir": tokenizer_dir, **MICRO_PRETRAIN}
    args.update({key.replace("-", "_"): value for key, value in overrides.items()})
    flat = []
    for key, value in args.items():
        flat += [f"--{key.replace('_', '-')}", str(value)]
    return flat


def run_script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    command = [PYTHON, str(REPO / "scripts" / "pretrain.py")] + args
    result = subprocess.run(
        command, env=script_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, real_slice_corpus_dir, slice_tokenizer_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    run_script(micro_args(run_dir, real_slice_corpus_dir, slice_tokenizer_dir))
    return run_dir


def test_run_directory_contents(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 24
    assert set(summary["validation_loss"]) == {"en", "fr", "de"}
    # nats/char ≈ nats/token ÷ characters per token: a few chars per token on this tokenizer
    for lang, per_char in summary["validation_nats_per_char"].items():
        assert 0 < per_char < summary["validation_loss"][lang]
    assert set(summary["language_consistency"]) == {"greedy", "sampled"}
    assert summary["language_consistency"]["greedy"]["en"]["n"] == 3
    # Loadable by the generic HF entry points, from safetensors.
    model = AutoModelForCausalLM.from_pretrained(finished_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "model")
    assert (finished_run / "model" / "model.safetensors").exists()
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tokenizer)
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in metrics if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [8, 16, 24]
    assert validation[-1]["loss/en"] < validation[0]["loss/en"], "validation loss did not go down"
    assert (finished_run / "loss_curves.png").stat().st_size > 10_000
    assert json.loads((finished_run / "config.json").read_text())["max_steps"] == 24
    generations = [json.loads(line) for line in (finished_run / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 * 3 * 3 and {"prompt", "continuation", "detected"} <= set(generations[0])


def test_resume_after_real_kill_gives_identical_weights(
    finished_run, tmp_path, real_slice_corpus_dir, slice_tokenizer_dir
):
    run_dir = tmp_path / "killed"
    # Same run, but checkpointing every 2 steps; eval/log cadence does not touch the training state.
    args = micro_args(run_dir, real_slice_corpus_dir, slice_tokenizer_dir, **{"ckpt-every": 2})
    process = subprocess.Popen(
        [PYTHON, str(REPO / "scripts" / "pretrain.py")] + args,
        env=script_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(process, lambda: checkpoint_step(run_dir), 6)
    assert not (run_dir / "summary.json").exists()
    run_script(args)  # resumes from the last complete checkpoint
    resumed, reference = final_weights(run_dir), final_weights(finished_run)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), f"{name} differs after resume"
    steps = [
        r["step"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "train"
    ]
    assert steps == sorted(set(steps)), "metrics after the checkpoint were not truncated on resume"


def test_ddp_two_processes_match_gradient_accumulation(tmp_path, real_slice_corpus_dir, slice_tokenizer_dir):
    common = {"max-steps": 6, "micro-batch": 2, "eval-every": 100, "gen-prompts": 1}
    single = tmp_path / "single"
    run_script(micro_args(single, real_slice_corpus_dir, slice_tokenizer_dir, **common, **{"grad-accum": 2}))
    ddp = tmp_path / "ddp"
    run_torchrun("pretrain.py", micro_args(ddp, real_slice_corpus_dir, slice_tokenizer_dir, **common))
    a, b = final_weights(single), final_weights(ddp)
    for name in a:
        # Same blocks, same averaged gradients: equal up to float summation order.
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs between DDP and accumulation"
        )
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["tokens_trained"] == 6 * 2 * 2 * 32


def test_changed_config_in_existing_run_dir_is_refused(
    finished_run, real_slice_corpus_dir, slice_tokenizer_dir
):
    (finished_run / "summary.json").rename(finished_run / "summary.json.bak")
    try:
        config = PretrainConfig(**{**json.loads((finished_run / "config.json").read_text()), "lr": 0.5})
        with pytest.raises(ValueError, match=r"different config \(lr: 0.003 → 0.5\)"):
            pretrain(config)
    finally:
        (finished_run / "summary.json.bak").rename(finished_run / "summary.json")


def test_learning_rate_schedule():
    config = PretrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, 110, config) == pytest.approx(0.1)
    assert learning_rate(9, 110, config) == pytest.approx(1.0)
    assert learning_rate(60, 110, config) == pytest.approx(0.55)
    assert learning_rate(110, 110, config) == pytest.approx(0.1)


def test_unknown_preset_is_refused(tmp_path, real_slice_corpus_dir, slice_tokenizer_dir):
    config = PretrainConfig(
        run_dir=str(tmp_path / "r"),
        corpus_dir=str(real_slice_corpus_dir),
        tokenizer_dir=str(slice_tokenizer_dir),
        preset="huge",
        mixture="en=1.0",
        token_budget=1000,
    )
    # The message lists every preset the library knows, so a user sees the choices in one line.
    with pytest.raises(
        ValueError, match=re.escape(f"unknown model preset 'huge'; presets: {sorted(MODEL_PRESETS)}")
    ):
        pretrain(config)
    assert config_to_dict(config)["preset"] == "huge"


def test_nats_per_char_matches_hf_losses_by_hand(slice_tokenizer_dir):
    """Σ over texts of (HF mean loss × predicted tokens, BOS-prefixed) / characters, one text at a time —
    and the windowed path for a text longer than the context gives the sum of its windows."""
    import torch
    from transformers import AutoTokenizer

    from tests.helpers import tiny_gpt2
    from training.evaluate import nats_per_char

    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer).eval()
    texts = ["Click OK to close the dialog.", "Cliquez sur OK pour fermer la boîte de dialogue.", "Ja"]
    by_hand = 0.0
    for text in texts:
        ids = torch.tensor(
            [[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]]
        )
        by_hand += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    expected = by_hand / sum(len(t) for t in texts)
    assert nats_per_char(model, tokenizer, texts, n_ctx=32, device=torch.device("cpu")) == pytest.approx(
        expected, rel=1e-5
    )
    long_text = " ".join(texts * 6)
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 31
    windows = [ids[i : i + 15] for i in range(0, len(ids), 15)]
    total = 0.0
    for window in windows:
        tensor = torch.tensor([[tokenizer.bos_token_id] + window])
        total += model(input_ids=tensor, labels=tensor).loss.item() * len(window)
    got = nats_per_char(model, tokenizer, [long_text], n_ctx=16, device=torch.device("cpu"), batch_size=3)
    assert got == pytest.approx(total / len(long_text), rel=1e-5)


def test_warmup_stable_decay_schedule():
    config = PretrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(0, 100, config) == pytest.approx(0.1)
    assert [learning_rate(s, 100, config) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable phase
    assert learning_rate(80, 100, config) == pytest.approx(0.95)  # 20 decay steps, linear
    assert learning_rate(99, 100, config) == pytest.approx(0.0)
    # The stable phase does not depend on the total: a longer run passes through a shorter one's state.
    assert all(learning_rate(s, 100, config) == learning_rate(s, 1000, config) for s in range(80))


def test_thread_share_per_rank_and_its_override(monkeypatch):
    """A CPU rank takes its share of the cores (cpu_count // ranks on the node); MLCLT_THREADS_PER_RANK
    overrides the share (the per-core scaling benchmark runs every rank on one thread)."""
    from training.loop import init_distributed

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        init_distributed("cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("MLCLT_THREADS_PER_RANK", "1")
        init_distributed("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
