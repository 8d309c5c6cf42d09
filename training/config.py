"""One CLI mechanism for every script: a dataclass describes a run, argparse is derived from it.

`parse_config(MyConfig)` gives each field a `--field-name` flag (help text from the field's
`metadata={"help": ...}`), accepts `--config run.json` to start from a saved config, and lets explicit
flags override it. Run directories (`RunDir`) hold the config, JSONL metrics and outputs, written
atomically so that a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _field_type(field: dataclasses.Field, owner: type) -> Any:
    hints = typing.get_type_hints(owner)
    return hints[field.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parser_for(tp: Any):
    """Turn a field's annotation into an argparse `type` callable."""
    tp, optional = _unwrap_optional(tp)
    if tp is bool:
        base = _parse_bool
    elif tp in (int, float, str):
        base = tp
    elif typing.get_origin(tp) in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        item_parser = _parser_for(item)
        base = lambda text: [item_parser(t) for t in text.split(",") if t.strip()]  # noqa: E731
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    if optional:
        return lambda text: None if text.lower() in ("none", "null", "") else base(text)
    return base


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description or (config_cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="JSON file with a saved config (e.g. a run directory's config.json); flags override it",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an input error instead of one line",
    )
    for flag, (path, field, owner, default) in config_flags(config_cls).items():
        parser.add_argument(
            "--" + flag.replace("_", "-"),
            dest=".".join(path),
            type=_parser_for(_field_type(field, owner)),
            default=argparse.SUPPRESS,
            # argparse %-formats help strings: a literal "%" (e.g. "top 1%") must be doubled.
            help=f"{field.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"),
        )
    return parser


def config_flags(
    config_cls: type, prefix: str = "", path: tuple[str, ...] = (), defaults: Any = None
) -> dict:
    """flag name → (path of field names, field, owning class, default) for every leaf field.

    A field whose type is itself a config dataclass is *composed*: its fields become flags of their own,
    named with the field's `metadata["prefix"]` (e.g. `collect_` → `--collect-n-tokens`), so one
    dataclass (CollectOptions, CLTOptions) is declared once and reused by every config that needs it."""
    defaults = config_cls() if defaults is None else defaults
    flags = {}
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        tp = _field_type(field, config_cls)
        value = getattr(defaults, field.name)
        if dataclasses.is_dataclass(tp):
            flags.update(
                config_flags(tp, prefix + field.metadata.get("prefix", ""), path + (field.name,), value)
            )
        else:
            flags[prefix + field.name] = (path + (field.name,), field, config_cls, value)
    return flags


def config_from_dict(config_cls: type[T], values: dict[str, Any]) -> T:
    """Build a config from its saved (nested) form, from flat flag names, or a mix of both."""
    flags = config_flags(config_cls)
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key in flags:
            path = flags[key][0]
        elif "." in key and tuple(key.split(".")) in {f[0] for f in flags.values()}:
            path = tuple(key.split("."))
        else:
            path = (key,)
        target = nested
        for name in path[:-1]:
            target = target.setdefault(name, {})
        if isinstance(value, dict) and isinstance(target.get(path[-1]), dict):
            target[path[-1]].update(value)
        else:
            target[path[-1]] = value
    return _construct(config_cls, nested)


def _construct(config_cls: type[T], values: dict[str, Any], defaults: Any = None) -> T:
    """`config_cls` with `values` over `defaults` (an instance; None = the class's own defaults).

    A nested config starts from its parent's default for that field — a parent may give a nested
    config defaults of its own (`default_factory`), and those must hold for every field not given."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        from training.errors import UserError

        raise UserError(f"unknown {config_cls.__name__} fields {unknown}; known fields: {sorted(fields)}")
    defaults = config_cls() if defaults is None else defaults
    kwargs = {}
    for name, value in values.items():
        tp = _field_type(fields[name], config_cls)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = _construct(tp, value, getattr(defaults, name))
        else:
            kwargs[name] = value
    return dataclasses.replace(defaults, **kwargs)


def parse_config(config_cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Build `config_cls` from `--config FILE` (optional) overridden by explicit flags."""
    parser = build_parser(config_cls, description)
    namespace = vars(parser.parse_args(argv))
    namespace.pop("debug", None)  # consumed by run_main
    config_path = namespace.pop("config")
    values: dict[str, Any] = json.loads(Path(config_path).read_text()) if config_path is not None else {}
    # Explicit flags override the file, field by field (also inside composed configs).
    return config_from_dict(config_cls, {**_flatten(values), **namespace})


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):  # a composed config, saved nested
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _field_defaults(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every field's own default (as saved), flattened like `_flatten`; composed configs recurse into their
    class's defaults."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_field_defaults(type(value)(), f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = json.loads(json.dumps(f.default, default=str))
        elif f.default_factory is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = json.loads(json.dumps(f.default_factory(), default=str))
    return out


def run_main(main: typing.Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)`: a `UserError` becomes one line on stderr and exit code 2
    (with `--debug`, the traceback); every other exception is a bug and keeps its traceback."""
    import sys

    from training.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        main(argv)
    except UserError as error:
        if "--debug" in argv:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _as_saved(config: Any) -> dict[str, Any]:
    """The config as `config.json` holds it (JSON types)."""
    return json.loads(json.dumps(config_to_dict(config), default=str))


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# Atomic files and run directories
# ---------------------------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same directory + os.replace: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunDir:
    """A run directory: `config.json`, `metrics.jsonl` and whatever outputs the run writes.

    The one contract every script and benchmark follows: `RunDir.open(path, config, may_change=...)`
    refuses a directory holding a run with another config (naming the differing fields; only the
    fields listed in `may_change` — e.g. the device, or which sections to run — may differ, and the
    run's own `run_dir`, so that a run directory may be moved or copied), then saves the config.
    Results are appended as JSON records; `keyed(fields)` reads them back by key so a re-run skips what
    is done. Every file is written atomically.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        config: Any,
        may_change: typing.Iterable[str] = ("device",),
        save: bool = True,
    ) -> "RunDir":
        run = cls(path)
        run.check_config(config, may_change)
        if save:
            run.save_config(config)
        return run

    def check_config(self, config: Any, may_change: typing.Iterable[str] = ("device",)) -> None:
        """Refuse a directory whose saved config differs from `config` outside `may_change`."""
        from training.errors import ConfigMismatch

        if not self.config_path.exists():
            return
        saved = _flatten(json.loads(self.config_path.read_text()))
        current = _flatten(_as_saved(config))
        # A field added to a config class after the run was saved is compatible if it keeps the value that
        # reproduces the behaviour from before it existed: its own class's default (not a default a
        # composing config's factory gives it, e.g. the base models' clt.compile = True).
        defaults = _field_defaults(config)
        allowed = set(may_change)

        def differs(key: str) -> bool:
            # A run is what it computes, not where it lives: a moved or copied run directory is the same run.
            if key == "run_dir":
                return False
            if key in allowed or key.split(".")[0] in allowed:
                return False
            if key not in saved and current.get(key) == defaults.get(key):
                return False
            return saved.get(key) != current.get(key)

        differing = sorted(k for k in set(saved) | set(current) if differs(k))
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in differing)
            raise ConfigMismatch(
                f"{self.path} holds a run with a different config ({details}); "
                "use another --run-dir or delete that one"
            )

    def check_inputs(self, inputs: dict[str, str]) -> None:
        """Refuse a directory whose results were computed from other contents of the same input paths
        (`inputs`: name → sha256, e.g. a CLT retrained in place): the config is unchanged, so the run
        would otherwise reuse stale sections. Inputs are recorded in `inputs.json` the first time."""
        from training.errors import ConfigMismatch

        path = self.path / "inputs.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        changed = sorted(name for name, digest in inputs.items() if saved.get(name, digest) != digest)
        if changed:
            raise ConfigMismatch(
                f"{self.path} was computed from another {' and '.join(changed)} (its sha256 changed since): "
                "its results would be stale; delete that directory or use another --run-dir"
            )
        atomic_write_json(path, {**saved, **inputs})

    def keyed(self, fields: typing.Sequence[str]) -> dict[tuple, dict[str, Any]]:
        """Records that carry every key field, by their key (a later record replaces an earlier one)."""
        return {tuple(r[f] for f in fields): r for r in self.read_metrics() if all(f in r for f in fields)}

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def save_config(self, config: Any) -> None:
        atomic_write_json(self.config_path, config_to_dict(config))

    def load_config(self, config_cls: type[T]) -> T:
        return config_from_dict(config_cls, json.loads(self.config_path.read_text()))

    def log_metrics(self, record: dict[str, Any]) -> None:
        # One JSON object per line, flushed at once: a crash loses at most the line being written,
        # and `read_metrics` skips a torn last line.
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
            handle.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # torn last line after a kill
        return records

    def truncate_metrics(self, keep: typing.Callable[[dict[str, Any]], bool]) -> None:
        """On resume, drop records written after the checkpoint we resume from (they will be redone)."""
        kept = [r for r in self.read_metrics() if keep(r)]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
