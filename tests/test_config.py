import json
from dataclasses import dataclass, field

import pytest

from training.config import RunDir, atomic_write_json, parse_config


@dataclass
class Example:
    name: str = "a"
    steps: int = 3
    rate: float = 0.5
    flag: bool = False
    langs: list[str] = field(default_factory=lambda: ["en", "fr"])
    limit: int | None = None


def test_defaults_and_flags():
    assert parse_config(Example, []) == Example()
    config = parse_config(
        Example, ["--steps", "7", "--flag", "true", "--langs", "de,zh", "--limit", "4", "--rate", "1e-3"]
    )
    assert config == Example(steps=7, flag=True, langs=["de", "zh"], limit=4, rate=1e-3)
    assert parse_config(Example, ["--limit", "none"]).limit is None


def test_config_file_overridden_by_flags(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"name": "from-file", "steps": 11}))
    config = parse_config(Example, ["--config", str(path), "--steps", "12"])
    assert (config.name, config.steps) == ("from-file", 12)


def test_unknown_field_in_file_is_an_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(ValueError, match="unknown Example fields \\['stepz'\\]"):
        parse_config(Example, ["--config", str(path)])


def test_bad_bool_is_rejected():
    with pytest.raises(SystemExit):
        parse_config(Example, ["--flag", "maybe"])


def test_run_dir_roundtrip_and_torn_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_config(Example(steps=9))
    assert run.load_config(Example) == Example(steps=9)
    run.log_metrics({"step": 1, "loss": 2.0})
    run.log_metrics({"step": 2, "loss": 1.0})
    with open(run.metrics_path, "a") as handle:
        handle.write('{"step": 3, "lo')  # a line torn by a kill
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    run.truncate_metrics(lambda r: r["step"] <= 1)
    assert [r["step"] for r in run.read_metrics()] == [1]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_nested_configs_keep_their_parents_defaults():
    """A composed config's own defaults for a nested one (default_factory) hold for every field not
    given, whether the config comes from flags or from a dict (reproduce.py builds stages from dicts)."""
    from training.base_models import BaseModelsConfig
    from training.config import config_from_dict

    from_dict = config_from_dict(BaseModelsConfig, {"clt_n_features": 16, "pretrain_preset": "tiny"})
    from_flags = parse_config(BaseModelsConfig, ["--clt-n-features", "16", "--pretrain-preset", "tiny"])
    assert from_dict == from_flags
    assert from_dict.clt.clt.n_features == 16 and from_dict.pretrain.preset == "tiny"
    defaults = BaseModelsConfig()
    assert from_dict.clt.collect.mixture == defaults.clt.collect.mixture == "balanced+eu"
    assert from_dict.pretrain.tokenizer_mixture == defaults.pretrain.tokenizer_mixture == "balanced"
    assert from_dict.locate == defaults.locate
