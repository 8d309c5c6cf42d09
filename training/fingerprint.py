"""Content hashes of model weights and files: a store, a CLT or a located-units file records the hash of
the model it was made from, so that using it with other weights is caught."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of the model weights: a store (and a CLT) records it so that mismatches are caught."""
    path = Path(model_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: expected a save_pretrained directory with safetensors weights"
        )
    return file_sha256(path)
