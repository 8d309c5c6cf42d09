"""Crosscoders (clt/crosscoder.py, clt/paired.py, clt/crosscoder_train.py) on cases with known answers."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from clt.crosscoder import Crosscoder, CrosscoderConfig, classify_latents, latent_scaling
from clt.loss import clt_loss
from tests.conftest import PYTHON, REPO, checkpoint_step, collect_args, kill_when, script_env


def planted_pair(n: int, d: int = 16, n_dirs: int = 24, seed: int = 0):
    """Model A: sparse combinations of a shared dictionary. Model B = A plus one planted direction on the
    tokens of one "language" (a third of them) — the fine-tuning effect a diff must find."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)
    codes = torch.rand(n, n_dirs, generator=g) * (torch.rand(n, n_dirs, generator=g) < 0.12)
    a = codes @ dictionary
    planted = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    lang = torch.rand(n, generator=g) < 0.33
    b = a + lang[:, None] * (1.5 + torch.rand(n, 1, generator=g)) * planted
    return torch.stack([a, b], dim=1), planted, dictionary  # [n, 2 models × 1 site, d]


def test_a_planted_direction_comes_out_as_an_after_only_latent_and_the_rest_shared():
    x, planted, _ = planted_pair(8192)
    torch.manual_seed(0)
    crosscoder = Crosscoder(
        CrosscoderConfig(n_features=48, activation="topk", k=6, n_models=2, n_sites=1, d_model=16)
    )
    crosscoder.initialize_from_batch(x[:512], x[:512])
    optimizer = torch.optim.Adam(crosscoder.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        batch = x[torch.randint(len(x), (256,), generator=g)]
        loss = clt_loss(crosscoder, batch, batch, sparsity_coefficient=0.0, preact_coefficient=0.0).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x_hat, acts, _ = crosscoder(x)
        fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        relative = crosscoder.relative_norms()
        alive = (acts[:, 0] > 0).any(0)
        # the latent whose B decoder points along the planted direction
        cosine = torch.nn.functional.cosine_similarity(crosscoder.W_dec[:, 1], planted[None], dim=1)
        planted_latent = int(cosine.argmax())
    assert fvu < 0.15, fvu
    assert cosine[planted_latent] > 0.9 and relative[planted_latent] > 0.9, (
        cosine[planted_latent],
        relative[planted_latent],
    )
    others = relative[alive & (torch.arange(48) != planted_latent)]
    assert abs(float(others.median()) - 0.5) < 0.05, others
    counts = classify_latents(relative, alive)
    assert counts["b_only"] >= 1 and counts["shared"] >= 0.7 * int(alive.sum())
    # Latent scaling: A does not carry the planted direction, so ν ≈ 0 for it
    scaling = latent_scaling(crosscoder, x[:2048], [planted_latent])[planted_latent]
    assert abs(scaling["nu_reconstruction"]) < 0.15 and abs(scaling["nu_error"]) < 0.15, scaling
    assert scaling["beta_b"] > 0.8


@torch.no_grad()
def test_latent_scaling_by_hand():
    """A hand-built crosscoder with one latent whose B decoder is e0 and whose A decoder is 0."""
    crosscoder = Crosscoder(
        CrosscoderConfig(n_features=2, activation="relu", n_models=2, n_sites=1, d_model=3)
    )
    crosscoder.W_enc.zero_()
    crosscoder.W_enc[1, 0, 0] = 1.0  # latent 0 reads B's first coordinate
    crosscoder.W_dec.zero_()
    crosscoder.W_dec[0, 1] = torch.tensor([1.0, 0.0, 0.0])
    crosscoder.b_dec.zero_()
    f = torch.tensor([1.0, 2.0, 3.0])
    e0 = torch.tensor([1.0, 0.0, 0.0])
    b = f[:, None] * e0
    # A truly without the direction: ν = 0. A with half of it, unexplained (in A's error): ν_error = 0.5.
    for a_share, expected in ((0.0, 0.0), (0.5, 0.5)):
        x = torch.stack([a_share * b, b], dim=1)
        result = latent_scaling(crosscoder, x, [0])[0]
        assert result["beta_b"] == pytest.approx(1.0)
        assert result["nu_error"] == pytest.approx(expected) and result["nu_reconstruction"] == pytest.approx(
            0.0
        )
    assert crosscoder.relative_norms()[0] == pytest.approx(1.0)


def test_decoder_log_ratios_and_layer_brightening_by_hand():
    """Latents 0–2 write twice as strongly into the after model at site 1; the after model's site-0
    activations are twice as large (scale ½), which moves every latent alike and no chosen set."""
    from analysis.crosscoder_diff import decoder_log_ratios, layer_brightening

    F, d = 40, 4
    crosscoder = Crosscoder(CrosscoderConfig(n_features=F, n_sites=2, d_model=d, activation="relu"))
    with torch.no_grad():
        crosscoder.W_dec.copy_(torch.randn(F, 1, d).expand(F, 4, d))  # inputs: a0 a1 b0 b1
        crosscoder.W_dec[:3, 3] *= 2.0
        crosscoder.output_scale.copy_(torch.tensor([1.0, 1.0, 0.5, 1.0]))
    ratios = decoder_log_ratios(crosscoder)
    assert torch.allclose(ratios[0], torch.ones(F), atol=1e-6)  # site 0: the scale, every latent
    assert torch.allclose(ratios[1, :3], torch.ones(3), atol=1e-6) and ratios[1, 3:].abs().max() < 1e-6
    ever = torch.ones(F, dtype=torch.bool)
    ever[-1] = False  # a dead latent is outside every null
    rows = layer_brightening(crosscoder, [2, 3], ever, torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))
    assert [r["layer"] for r in rows] == [2, 3]
    assert rows[0]["all_live_mean_log2"] == pytest.approx(1.0)
    assert rows[0]["focus_specific"]["observed"] == pytest.approx(rows[0]["focus_specific"]["null_mean"])
    late = rows[1]["focus_specific"]
    assert late["observed"] == pytest.approx(1.0) and late["null_high"] < 1.0 and late["p_at_least"] == 0
    assert rows[1]["cross_lingual"]["observed"] == pytest.approx(0.0, abs=1e-6)


def test_paired_stores_of_different_tokens_are_refused(
    tiny_model_dir, real_slice_corpus_dir, tiny_store, tmp_path
):
    from clt.activations import CollectConfig, collect_activations
    from clt.paired import PairedStore, PairedStoreMismatch

    other = collect_activations(
        CollectConfig(
            **{**collect_args(tiny_model_dir, tmp_path / "other.zarr", real_slice_corpus_dir), "seed": 1}
        )
    )
    with pytest.raises(PairedStoreMismatch, match="different tokens"):
        PairedStore(tiny_store, other, "mlp_out", [1]).read_shard(0)
    same = PairedStore(tiny_store, tiny_store, "mlp_out", [0, 1])
    shard = same.read_shard(0)
    assert shard["mlp_in"].shape[1:] == (4, 32)  # 2 models × 2 sites
    assert (shard["mlp_in"][:, :2] == shard["mlp_in"][:, 2:]).all()
    smaller = collect_activations(
        CollectConfig(
            **{
                **collect_args(tiny_model_dir, tmp_path / "small.zarr", real_slice_corpus_dir),
                "n_tokens": 1000,
            }
        )
    )
    with pytest.raises(PairedStoreMismatch, match="shards"):
        PairedStore(tiny_store, smaller, "mlp_out", [1])


def crosscoder_command(run_dir, model_dir, store, corpus_dir, ckpt_every: int) -> list[str]:
    args = collect_args(model_dir, store, corpus_dir)
    return [
        PYTHON,
        str(REPO / "scripts" / "train_crosscoder.py"),
        "--model-a",
        str(model_dir),
        "--model-b",
        str(model_dir),
        "--store-a",
        str(store),
        "--store-b",
        str(store),
        "--corpus-dir",
        str(corpus_dir),
        "--collect-mixture",
        args["mixture"],
        "--collect-n-tokens",
        str(args["n_tokens"]),
        "--collect-n-ctx",
        str(args["n_ctx"]),
        "--collect-blocks-per-shard",
        str(args["blocks_per_shard"]),
        "--collect-blocks-per-chunk",
        str(args["blocks_per_chunk"]),
        "--layers",
        "0,1",
        "--n-features",
        "32",
        "--k",
        "4",
        "--batch-size",
        "64",
        "--max-steps",
        "24",
        "--warmup-steps",
        "2",
        "--log-every",
        "4",
        "--ckpt-every",
        str(ckpt_every),
        "--run-dir",
        str(run_dir),
        "--device",
        "cpu",
    ]


def test_crosscoder_training_resumes_after_a_kill_with_identical_weights(
    tiny_model_dir, tiny_store, real_slice_corpus_dir, tmp_path
):
    reference = tmp_path / "reference"
    result = subprocess.run(
        crosscoder_command(reference, tiny_model_dir, tiny_store.url, real_slice_corpus_dir, 24),
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latent_counts" in result.stdout
    killed = tmp_path / "killed"
    command = crosscoder_command(killed, tiny_model_dir, tiny_store.url, real_slice_corpus_dir, 4)
    process = subprocess.Popen(
        command, env=script_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when(process, lambda: checkpoint_step(killed), 12)
    again = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_file(str(reference / "crosscoder" / "crosscoder.safetensors"))
    b = load_file(str(killed / "crosscoder" / "crosscoder.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    import json

    summary = json.loads((reference / "summary.json").read_text())
    held = summary["heldout"]
    # the same model twice: every live latent is shared (relative norm 0.5 up to training noise)
    assert len(held["fvu_per_input"]) == 4 and held["latent_counts"]["b_only"] == 0
