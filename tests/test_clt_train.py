"""CLT training end to end on a tiny model and store: metrics, resume after a real kill, evaluation,
and exports loaded back by circuit-tracer and sae-lens."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clt.evaluate import ReplacementMLPs, replacement_metrics
from clt.export import export_circuit_tracer, export_sae_lens, folded_weights, load_native, save_native
from clt.train import CLTTrainConfig, train_clt
from tests.conftest import PYTHON, REPO, checkpoint_step, kill_when, run_torchrun, script_env
from training.config import config_from_dict


def train_args(run_dir, tiny_model_dir, tiny_store, corpus_dir, **overrides) -> dict:
    args = {
        "run_dir": str(run_dir),
        "model_dir": str(tiny_model_dir),
        "store": tiny_store.url,
        "corpus_dir": str(corpus_dir),
        "n_features": 64,
        "batch_size": 128,
        "max_steps": 60,
        "lr": 3e-3,
        "warmup_steps": 5,
        "sparsity_coefficient": 0.01,
        "log_every": 5,
        "ckpt_every": 20,
        "eval_blocks": 4,
        "collect_n_ctx": 16,
        "dead_window_tokens": 3000,
    }
    args.update(overrides)
    return args


def as_flags(args: dict) -> list[str]:
    flags = []
    for key, value in args.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_store, real_slice_corpus_dir):
    run_dir = tmp_path_factory.mktemp("clt") / "reference"
    report = train_clt(
        config_from_dict(
            CLTTrainConfig, train_args(run_dir, tiny_model_dir, tiny_store, real_slice_corpus_dir)
        )
    )
    return run_dir, report


def test_training_reduces_error_and_reports_everything(trained):
    run_dir, report = trained
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["mse"] < 0.5 * metrics[0]["mse"], "reconstruction error did not fall"
    assert len(metrics[-1]["fvu_per_layer"]) == 2 and len(metrics[-1]["l0_per_layer"]) == 2
    held = report["heldout"]["all"]
    assert all(0 <= f < 1 for f in held["fvu"]), held["fvu"]
    assert set(report["heldout"]) >= {"all", "en", "fr", "de"}
    assert len(report["dead_fraction_per_layer"]) == 2
    replacement = report["replacement"]
    assert set(replacement) == {"all", "en", "fr", "de"}
    assert replacement["all"]["kl"] >= 0 and 0 <= replacement["all"]["top1_agreement"] <= 1
    clt, meta = load_native(run_dir / "clt")
    assert meta["model_sha256"] and clt.config.n_features == 64


def test_resume_after_real_kill_gives_identical_weights(
    trained, tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir
):
    reference_dir, _ = trained
    run_dir = tmp_path / "killed"
    args = train_args(run_dir, tiny_model_dir, tiny_store, real_slice_corpus_dir, ckpt_every=4)
    # Only the checkpoint cadence differs from the reference run, and it does not touch training.
    command = [PYTHON, str(REPO / "scripts" / "train_clt.py")] + as_flags(args)
    process = subprocess.Popen(
        command, env=script_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when(process, lambda: checkpoint_step(run_dir), 12)
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replacement model vs real" in result.stdout
    a, b = (
        load_file(str(reference_dir / "clt" / "clt.safetensors")),
        load_file(str(run_dir / "clt" / "clt.safetensors")),
    )
    # The reference's checkpoint cadence differs (20 vs 4), which must not matter.
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert (run_dir / "circuit_tracer" / "config.yaml").exists()


def test_circuit_tracer_loads_our_clt_and_reconstructs_identically(trained, tiny_store):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    run_dir, _ = trained
    clt, _ = load_native(run_dir / "clt")
    out = export_circuit_tracer(clt, run_dir / "ct_export")
    loaded = load_clt(
        str(out),
        feature_input_hook="ln2.hook_normalized",
        feature_output_hook="hook_mlp_out",
        lazy_decoder=False,
        lazy_encoder=False,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    data = tiny_store.read_shard(0)
    x_raw = torch.from_numpy(data["mlp_in"][:50]).float()
    theirs_acts = loaded.encode(x_raw.transpose(0, 1))  # circuit-tracer takes [layer, batch, d]
    theirs = loaded.decode(theirs_acts.to_sparse()).transpose(0, 1)
    with torch.no_grad():
        ours, ours_acts, _ = clt(x_raw * clt.input_scale[None, :, None])
        ours = ours / clt.output_scale[None, :, None]
    torch.testing.assert_close(theirs_acts.transpose(0, 1), ours_acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert "model_kind: cross_layer_transcoder" in (out / "config.yaml").read_text()


@pytest.fixture(scope="module")
def trained_plt(tmp_path_factory, tiny_model_dir, tiny_store, real_slice_corpus_dir):
    run_dir = tmp_path_factory.mktemp("plt") / "plt"
    train_clt(
        config_from_dict(
            CLTTrainConfig,
            train_args(
                run_dir,
                tiny_model_dir,
                tiny_store,
                real_slice_corpus_dir,
                cross_layer=False,
                skip=True,
                max_steps=20,
            ),
        )
    )
    clt, _ = load_native(run_dir / "clt")
    with torch.no_grad():
        clt.W_skip.normal_(0, 0.05)  # make the skip path non-trivial for the round trips
    return run_dir, clt


def test_plt_exports_as_circuit_tracer_transcoder_set(trained_plt, tiny_store):
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    run_dir, clt = trained_plt
    out = export_circuit_tracer(clt, run_dir / "ct_set")
    paths = {i: str(out / f"layer_{i}.safetensors") for i in range(2)}
    loaded = load_transcoder_set(
        paths,
        scan="test",
        feature_input_hook="ln2.hook_normalized",
        feature_output_hook="hook_mlp_out",
        dtype=torch.float32,
        device=torch.device("cpu"),
        lazy_encoder=False,
        lazy_decoder=False,
    )
    x_raw = torch.from_numpy(tiny_store.read_shard(1)["mlp_in"][:40]).float()
    with torch.no_grad():
        ours, _, _ = clt(x_raw * clt.input_scale[None, :, None])
        ours = ours / clt.output_scale[None, :, None]
        for layer in range(2):
            transcoder = loaded.transcoders[layer]
            theirs = transcoder.decode(
                transcoder.encode(x_raw[:, layer]), x_raw[:, layer]
            )  # includes the skip path
            torch.testing.assert_close(theirs, ours[:, layer], rtol=1e-4, atol=1e-4)


def test_plt_exports_to_sae_lens(trained_plt, tiny_store):
    from sae_lens import SAE

    run_dir, clt = trained_plt
    paths = export_sae_lens(clt, run_dir / "sae_lens")
    x_raw = torch.from_numpy(tiny_store.read_shard(1)["mlp_in"][:40]).float()
    with torch.no_grad():
        ours, ours_acts, _ = clt(x_raw * clt.input_scale[None, :, None])
        ours = ours / clt.output_scale[None, :, None]
        for layer, path in enumerate(paths):
            sae = SAE.load_from_disk(path)
            assert type(sae).__name__ == "JumpReLUSkipTranscoder"
            assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln2.hook_normalized"
            acts = sae.encode(x_raw[:, layer])
            torch.testing.assert_close(acts, ours_acts[:, layer], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                sae.decode(acts) + x_raw[:, layer] @ sae.W_skip.T, ours[:, layer], rtol=1e-4, atol=1e-4
            )
    from clt.model import CLTConfig, CrossLayerTranscoder

    cross_layer = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=4, n_features=3))
    with pytest.raises(ValueError, match="per-layer transcoders only"):
        export_sae_lens(cross_layer, run_dir / "nope")


def test_native_round_trip_and_folding_consistency(trained, tmp_path):
    run_dir, _ = trained
    clt, meta = load_native(run_dir / "clt")
    save_native(clt, tmp_path / "copy", {"note": "x"})
    again, meta2 = load_native(tmp_path / "copy")
    for (name, a), (_, b) in zip(clt.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert meta2["note"] == "x"
    assert folded_weights(clt)["W_enc"].shape == (2, 32, 64)


def test_replacement_hooks_are_removed_and_mismatches_refused(trained, tiny_model_dir):
    run_dir, _ = trained
    clt, _ = load_native(run_dir / "clt")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(2, 400, (2, 12))
    ids[:, 0] = 1
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with ReplacementMLPs(model, clt):
            replaced = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.equal(before, replaced)
    report = replacement_metrics(model, clt, ids, ["en", "fr"], batch_size=1)
    assert report["en"]["tokens"] == 10 and report["all"]["tokens"] == 20
    from clt.model import CLTConfig, CrossLayerTranscoder

    wrong = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=16, n_features=8))
    with pytest.raises(ValueError, match="transcoder is for 2 layers × 16, model has 2 × 32"):
        ReplacementMLPs(model, wrong)


def test_topk_cannot_be_exported_to_circuit_tracer(tmp_path):
    from clt.model import CLTConfig, CrossLayerTranscoder

    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=4, n_features=3, activation="topk", k=1))
    with pytest.raises(ValueError, match="no TopK transcoders"):
        export_circuit_tracer(clt, tmp_path / "x")


def test_stop_at_target_l0(tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir):
    args = train_args(
        tmp_path / "stop",
        tiny_model_dir,
        tiny_store,
        real_slice_corpus_dir,
        max_steps=40,
        lambda_warmup_frac=0.25,
        target_l0=1e9,
    )
    report = train_clt(config_from_dict(CLTTrainConfig, args))
    assert report["stopped_early"] and report["steps"] == 10  # right after the λ warm-up (25% of 40 steps)


def test_streaming_mode_trains_without_a_store(tmp_path, tiny_model_dir, real_slice_corpus_dir):
    args = train_args(
        tmp_path / "stream",
        tiny_model_dir,
        type("S", (), {"url": str(tmp_path / "unused.zarr")}),
        real_slice_corpus_dir,
        streaming=True,
        max_steps=15,
        collect_n_tokens=2000,
        collect_mixture="en=0.5,fr=0.25,de=0.25",
    )
    report = train_clt(config_from_dict(CLTTrainConfig, args))
    assert not (tmp_path / "unused.zarr").exists()
    assert report["steps"] == 15 and "heldout" not in report and report["replacement"]["all"]["kl"] >= 0
    metrics = [json.loads(line) for line in (tmp_path / "stream" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["mse"] < metrics[0]["mse"]


def test_ddp_training_with_torchrun_matches_one_process(
    tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir
):
    """2 gloo ranks reading disjoint shards end with the same transcoder as one process trained on the
    union of both ranks' batches (DDP averages per-token-mean gradients over equal batches)."""
    # 12 training shards (6 per rank) of 240 tokens; batches of 48 divide each rank's 1,440 tokens.
    common = dict(max_steps=20, batch_size=48, eval_shards=1, eval_blocks=2)
    ddp = train_args(tmp_path / "ddp", tiny_model_dir, tiny_store, real_slice_corpus_dir, **common)
    run_torchrun("train_clt.py", as_flags(ddp))
    single = train_args(
        tmp_path / "one", tiny_model_dir, tiny_store, real_slice_corpus_dir, emulate_ranks=2, **common
    )
    single_report = train_clt(config_from_dict(CLTTrainConfig, single))
    report = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert report["tokens"] == single_report["tokens"] == 20 * 48 * 2  # both ranks' batches count
    a = load_file(str(tmp_path / "ddp" / "clt" / "clt.safetensors"))
    b = load_file(str(tmp_path / "one" / "clt" / "clt.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_eval_and_export_scripts(trained, tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir):
    run_dir, report = trained
    out = tmp_path / "eval.json"
    command = [
        PYTHON,
        str(REPO / "scripts" / "eval_clt.py"),
        "--clt",
        str(run_dir / "clt"),
        "--model-dir",
        str(tiny_model_dir),
        "--store",
        tiny_store.url,
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--n-ctx",
        "16",
        "--eval-blocks",
        "4",
        "--run-dir",
        str(out),
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((out / "summary.json").read_text())
    # Same transcoder, same held-out shard (the store's last), same validation blocks: same numbers.
    assert evaluated["heldout"]["all"]["fvu"] == pytest.approx(report["heldout"]["all"]["fvu"], rel=1e-6)
    assert evaluated["replacement"]["all"]["kl"] == pytest.approx(
        report["replacement"]["all"]["kl"], rel=1e-5
    )
    export = subprocess.run(
        [
            PYTHON,
            str(REPO / "scripts" / "export_clt.py"),
            "--clt",
            str(run_dir / "clt"),
            "--format",
            "circuit-tracer",
            "--run-dir",
            str(tmp_path / "ct"),
        ],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ct" / "circuit_tracer").iterdir())[:3] == [
        "W_dec_0.safetensors",
        "W_dec_1.safetensors",
        "W_enc_0.safetensors",
    ]


def test_warm_start_keeps_every_feature_and_refuses_other_options(
    trained, tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir
):
    """--init-from continues a trained CLT: at lr 0 the result is the base CLT exactly (weights and
    scales), so feature i of the warm CLT is feature i of the base; other options are refused."""
    from training.errors import UserError

    reference_dir, _ = trained
    args = train_args(
        tmp_path / "warm", tiny_model_dir, tiny_store, real_slice_corpus_dir, max_steps=3, lr=0.0
    )
    config = config_from_dict(CLTTrainConfig, {**args, "init_from": str(reference_dir / "clt")})
    train_clt(config)
    base = load_file(str(reference_dir / "clt" / "clt.safetensors"))
    warm = load_file(str(tmp_path / "warm" / "clt" / "clt.safetensors"))
    for name in base:
        assert torch.equal(base[name], warm[name]), name
    other = config_from_dict(
        CLTTrainConfig,
        {
            **args,
            "run_dir": str(tmp_path / "other"),
            "n_features": 32,
            "init_from": str(reference_dir / "clt"),
        },
    )
    with pytest.raises(UserError, match="init-from"):
        train_clt(other)


def test_sweep_cell_is_the_same_run_as_train_clt(
    trained, tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir
):
    """benchmarks/sweep_clt.py: a cell is exactly the `train_clt` run of its settings (referee: the module's
    reference run), a per-layer cell really is per-layer, a grown grid reuses finished cells, and a flag the
    grid sets is refused."""
    from benchmarks.sweep_clt import cell_name, main
    from training.errors import UserError

    reference_dir, reference = trained
    args = train_args(tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir)
    for gridded in ("run_dir", "n_features", "sparsity_coefficient"):
        args.pop(gridded)
    flags = [f"--clt-{flag[2:]}" if flag.startswith("--") else flag for flag in as_flags(args)]
    mu = json.loads((reference_dir / "config.json").read_text())["preact_coefficient"]
    grid = ["--widths", "64", "--preacts", str(mu), "--run-dir", str(tmp_path / "sweep")]
    main([*flags, *grid, "--kinds", "clt,per-layer", "--lambdas", "0.01"])
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [(r["kind"], r["lambda"]) for r in rows] == [("clt", 0.01), ("per-layer", 0.01)]
    assert rows[0]["fvu"] == reference["heldout"]["all"]["fvu"]
    assert rows[0]["kl"] == reference["replacement"]["all"]["kl"]
    assert rows[0]["kl_per_language"] == {
        k: v["kl"] for k, v in reference["replacement"].items() if k != "all"
    }
    per_layer, meta = load_native(tmp_path / "sweep" / cell_name("per-layer", 64, 0.01, mu) / "clt")
    assert not per_layer.config.cross_layer and rows[1]["fvu"] != rows[0]["fvu"]

    finished = tmp_path / "sweep" / cell_name("clt", 64, 0.01, mu) / "summary.json"
    before = finished.stat().st_mtime_ns
    main([*flags, *grid, "--kinds", "clt", "--lambdas", "0.01,0.1"])
    assert finished.stat().st_mtime_ns == before, "a finished cell was trained again"
    table = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 2 and "| CLT | 64 | 0.1 |" in table[3]
    with pytest.raises(UserError, match="--clt-sparsity-coefficient is set by the grid"):
        main([*flags, *grid, "--clt-sparsity-coefficient", "0.5"])


def test_a_copied_run_directory_is_the_same_run(
    trained, tmp_path, tiny_model_dir, tiny_store, real_slice_corpus_dir
):
    """RunDir ignores the run's own `run_dir`: a finished run copied elsewhere is found finished there (no
    step is trained again), and any other changed field is still refused."""
    import shutil

    from training.errors import ConfigMismatch

    reference_dir, reference = trained
    copy = tmp_path / "copied"
    shutil.copytree(reference_dir, copy)
    metrics_before = (copy / "metrics.jsonl").read_text()
    args = train_args(copy, tiny_model_dir, tiny_store, real_slice_corpus_dir)
    again = train_clt(config_from_dict(CLTTrainConfig, args))
    assert again["heldout"] == reference["heldout"] and again["steps"] == reference["steps"]
    assert (copy / "metrics.jsonl").read_text() == metrics_before
    with pytest.raises(ConfigMismatch, match="sparsity_coefficient"):
        train_clt(config_from_dict(CLTTrainConfig, {**args, "sparsity_coefficient": 0.5}))
