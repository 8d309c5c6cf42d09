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
    path = in_release(model_dir, "model") / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: expected a save_pretrained directory with safetensors weights"
        )
    return file_sha256(path)


def clt_fingerprint(clt_dir: str | Path) -> str:
    """Hash of a native CLT's weights (`<dir>/clt.safetensors`, or a release's `clt/`)."""
    path = in_release(clt_dir, "clt") / "clt.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected a native CLT directory (scripts/train_clt.py)")
    return file_sha256(path)


def input_fingerprints(model_dir: str | Path, clt: str | Path | None = None, located=None) -> dict[str, str]:
    """sha256 of the weights (and located units) a run reads, for `RunDir.check_inputs`: a run that reuses
    finished results must not reuse them once a model, CLT or located.json was replaced at the same path."""
    fingerprints = {"model": model_fingerprint(model_dir)}
    if clt:
        fingerprints["clt"] = clt_fingerprint(clt)
    if located and in_release(located, "located.json").is_file():
        fingerprints["located"] = file_sha256(in_release(located, "located.json"))
    return fingerprints


# ---------------------------------------------------------------------------------------------
# Release manifests: models/<name>/MANIFEST.json lists the sha256 of every file of a release
# ---------------------------------------------------------------------------------------------

MANIFEST = "MANIFEST.json"


def release_files(release_dir: Path) -> dict[str, str]:
    """sha256 of every regular file below `release_dir` (the manifest itself excluded), by relative path."""
    release_dir = Path(release_dir)
    return {
        path.relative_to(release_dir).as_posix(): file_sha256(path)
        for path in sorted(release_dir.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST
    }


def write_manifest(release_dir: str | Path, command: str, **details) -> Path:
    """Write MANIFEST.json: the files' hashes, the exact command that made the release, and any details
    (corpus fingerprint, headline metrics, ...)."""
    import json

    from training.config import atomic_write_text

    release_dir = Path(release_dir)
    manifest = {"files": release_files(release_dir), "command": command, **details}
    path = release_dir / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def in_release(path: str | Path, part: str) -> Path:
    """`path`, or its `part` ("model", "clt", "located.json") when `path` is a release's root: so
    `--model-dir models/base-balanced` and `--clt models/base-balanced` both work."""
    path = Path(path)
    if (path / MANIFEST).is_file() and (path / part).exists():
        return path / part
    return path


def find_release(path: str | Path) -> Path | None:
    """The release directory holding `path` (it or a parent up to two levels has a MANIFEST.json)."""
    path = Path(path).resolve()
    for candidate in [path, *list(path.parents)[:2]]:
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


_VERIFIED: dict[Path, tuple] = {}  # release → the (mtime, size) of its files when last verified


def verify_release(path: str | Path) -> None:
    """If `path` belongs to a release, check every file the manifest lists against its hash (hashed again
    only when a file's mtime or size changed). A missing or modified file is refused in one line."""
    import json

    from training.errors import CorruptData

    release = find_release(path)
    if release is None:
        return
    manifest_path = release / MANIFEST
    expected = json.loads(manifest_path.read_text())["files"]
    stamp = tuple(_stat(release / relative) for relative in [MANIFEST, *sorted(expected)])
    if _VERIFIED.get(release) == stamp:
        return
    for relative, digest in expected.items():
        file = release / relative
        if not file.is_file():
            raise CorruptData(
                f"{file} is listed in {manifest_path} but missing: the release is incomplete; "
                "restore it from the repository (git checkout -- models/)"
            )
        if file_sha256(file) != digest:
            raise CorruptData(
                f"{file} does not match its sha256 in {manifest_path}: the release was modified; "
                "restore it (git checkout -- models/) or use your own copy outside models/"
            )
    _VERIFIED[release] = stamp


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_mtime_ns, info.st_size
