"""Training checkpoints with safetensors only (no pickle), swapped in atomically.

Layout of `<run>/checkpoint/`: `model.safetensors`, `optimizer.safetensors` (tensors of the optimizer
state, hyper-parameters in its JSON metadata), `rng.safetensors`, and `state.json` written last as the
completion marker. A new checkpoint is written to `checkpoint.tmp/` and renamed into place, keeping
the previous one as `checkpoint.old/` until the swap is done, so a kill at any instant leaves one
complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STATE_FILE = "state.json"


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            name = f"state.{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(json.loads(metadata["scalars"]).items()):
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def save_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    tensors, metadata = _flatten_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=metadata)
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint to resume from, if any (a kill mid-swap leaves `checkpoint.old`)."""
    for candidate in (run_dir / "checkpoint", run_dir / "checkpoint.old"):
        if (candidate / STATE_FILE).exists():
            return candidate
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    optimizer.load_state_dict(_unflatten_optimizer(tensors, metadata))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    return json.loads((path / STATE_FILE).read_text())
