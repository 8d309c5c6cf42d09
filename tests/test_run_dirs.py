"""The run-directory contract, for every entry point that writes one: a directory holding a run with
another config is refused before any work, with a message naming the differing fields; scripts turn
that into one line and exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from training.config import RunDir, config_from_dict
from training.errors import ConfigMismatch


def entry_points():
    """(name, config class, entry function, extra fields for a valid config, the field to change)."""
    from analysis.locate import LocateConfig, locate_language
    from analysis.model_diff_report import ModelDiffConfig, run_model_diff
    from attribution.overlap import OverlapConfig, run_overlap
    from attribution.run import AttributeConfig, run_attribution
    from clt.evaluate import EvalConfig, evaluate_clt
    from clt.export import ExportConfig, export
    from clt.train import CLTTrainConfig, train_clt
    from interventions.sae import SAEConfig, train_sae
    from interventions.sweep import SteerConfig, run_steering
    from training.compare import CompareConfig, compare_finetuning
    from training.finetune import FinetuneConfig, finetune
    from training.pretrain import PretrainConfig, pretrain

    return [
        ("pretrain", PretrainConfig, pretrain, {}, ("lr", 0.5)),
        ("finetune", FinetuneConfig, finetune, {}, ("model_dir", "elsewhere/model")),
        ("train_clt", CLTTrainConfig, train_clt, {}, ("model_dir", "elsewhere/model")),
        ("train_clt (composed field)", CLTTrainConfig, train_clt, {}, ("n_features", 7)),
        ("eval_clt", EvalConfig, evaluate_clt, {}, ("model_dir", "elsewhere/model")),
        ("export_clt", ExportConfig, export, {}, ("clt", "elsewhere/clt")),
        (
            "attribute",
            AttributeConfig,
            run_attribution,
            {"prompt": "Click OK"},
            ("model_dir", "elsewhere/model"),
        ),
        ("cross_lingual_overlap", OverlapConfig, run_overlap, {}, ("model_dir", "elsewhere/model")),
        ("locate_language", LocateConfig, locate_language, {}, ("model_dir", "elsewhere/model")),
        ("steer", SteerConfig, run_steering, {}, ("model_dir", "elsewhere/model")),
        ("steer (evaluation setting)", SteerConfig, run_steering, {}, ("n_prompts", 3)),
        ("train_sae", SAEConfig, train_sae, {}, ("model_dir", "elsewhere/model")),
        ("compare_finetuning", CompareConfig, compare_finetuning, {}, ("model_dir", "elsewhere/model")),
        ("model_diff", ModelDiffConfig, run_model_diff, {}, ("after", "elsewhere/model")),
    ]


@pytest.mark.parametrize("index", range(14))
def test_changed_config_is_refused_naming_the_field(index, tmp_path):
    name, config_cls, entry, extra, (field, value) = entry_points()[index]
    first = config_from_dict(config_cls, {"run_dir": str(tmp_path / "run"), **extra})
    RunDir.open(first.run_dir, first)
    changed = config_from_dict(config_cls, {**_flat(first), field: value})
    with pytest.raises(ConfigMismatch, match=rf"different config \(.*{field}: "):
        entry(changed)


def test_fields_allowed_to_change_do_not_refuse(tmp_path):
    from interventions.sweep import MAY_CHANGE, SteerConfig

    first = SteerConfig(run_dir=str(tmp_path / "run"))
    RunDir.open(first.run_dir, first, may_change=MAY_CHANGE)
    RunDir.open(
        first.run_dir,
        dataclasses.replace(first, strengths=[0.0, 16.0], methods=["clt"]),
        may_change=MAY_CHANGE,
    )
    with pytest.raises(ConfigMismatch, match="seed"):
        RunDir.open(first.run_dir, dataclasses.replace(first, seed=1), may_change=MAY_CHANGE)


def test_script_reports_a_refusal_in_one_line_with_exit_code_2(tmp_path):
    from interventions.sweep import SteerConfig
    from tests.conftest import PYTHON, REPO, script_env

    RunDir.open(tmp_path / "run", SteerConfig(run_dir=str(tmp_path / "run")))
    command = [
        PYTHON,
        str(REPO / "scripts" / "steer.py"),
        "--run-dir",
        str(tmp_path / "run"),
        "--n-prompts",
        "3",
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "n_prompts: 100 → 3" in lines[0], (
        result.stderr
    )
    debug = subprocess.run(
        command + ["--debug"], env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigMismatch" in debug.stderr


def _flat(config) -> dict:
    """A config's fields as flat flag names (composed configs spread out)."""
    from training.config import config_flags

    values = {}
    for flag, (path, _, _, _) in config_flags(type(config)).items():
        value = config
        for name in path:
            value = getattr(value, name)
        values[flag] = value
    return values


def test_a_field_added_later_with_its_default_does_not_refuse(tmp_path):
    """A run saved before a config field existed resumes as long as the new field keeps its default."""
    import json

    from training.pretrain import PretrainConfig

    config = PretrainConfig(run_dir=str(tmp_path / "run"))
    run = RunDir.open(config.run_dir, config)
    saved = json.loads(run.config_path.read_text())
    del saved["schedule"]  # as written by an older version
    run.config_path.write_text(json.dumps(saved))
    RunDir.open(config.run_dir, config)
    run.config_path.write_text(json.dumps(saved))
    with pytest.raises(ConfigMismatch, match=r"schedule: None → 'wsd'"):
        RunDir.open(config.run_dir, dataclasses.replace(config, schedule="wsd"))


def test_a_field_added_later_keeps_the_behaviour_from_before_it_existed(tmp_path):
    """For a composed config the compatible value of a new field is its own class's default — what runs
    did before the field existed — not the composing config's factory default (the base models set
    clt.compile = True; a base run saved before `compile` existed trained eagerly)."""
    import json

    from training.base_models import MAY_CHANGE, BaseModelsConfig

    config = BaseModelsConfig(runs_dir=str(tmp_path / "base"))
    assert config.clt.compile  # the composing factory's value
    run = RunDir.open(config.runs_dir, config, may_change=MAY_CHANGE)
    saved = json.loads(run.config_path.read_text())
    del saved["clt"]["compile"]  # as written before the field existed
    run.config_path.write_text(json.dumps(saved))
    with pytest.raises(ConfigMismatch, match=r"clt.compile: None → True"):
        RunDir.open(config.runs_dir, config, may_change=MAY_CHANGE)
    eager = dataclasses.replace(config, clt=dataclasses.replace(config.clt, compile=False))
    RunDir.open(config.runs_dir, eager, may_change=MAY_CHANGE)


def test_inputs_changed_behind_the_same_paths_are_refused(tmp_path):
    """check_inputs: recorded the first time, accepted while equal (a new input may join), refused in one
    message naming the input once a recorded hash differs."""
    run = RunDir(tmp_path / "run")
    run.check_inputs({"model": "a" * 64})
    run.check_inputs({"model": "a" * 64, "clt": "b" * 64})
    assert RunDir(tmp_path / "run").path.joinpath("inputs.json").exists()
    with pytest.raises(ConfigMismatch, match=r"computed from another clt \(its sha256 changed"):
        run.check_inputs({"model": "a" * 64, "clt": "c" * 64})
    with pytest.raises(ConfigMismatch, match="another clt and model"):
        run.check_inputs({"model": "d" * 64, "clt": "c" * 64})
