"""Fetch Debian packages' files offline-friendly: `apt-get download` + `dpkg -x` into a cache.

Nothing is installed system-wide. Extracted trees are cached per package, and a marker file written
last makes a half-extracted tree (after a kill) count as missing, so it is redone rather than read.
"""

from __future__ import annotations

import glob
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

DONE_MARKER = ".extracted"


class DebianFetchError(RuntimeError):
    pass


def download_deb(package: str, deb_dir: Path) -> Path:
    """Download `package`'s .deb into `deb_dir` (reusing one already there) and return its path."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(glob.glob(str(deb_dir / f"{package}_*.deb")))
    if existing:
        return Path(existing[-1])
    if shutil.which("apt-get") is None:
        raise DebianFetchError(
            f"apt-get is not available to download {package}. Download {package}_*.deb by hand into "
            f"{deb_dir} "
            "(any Debian/Ubuntu mirror) and run again."
        )
    with tempfile.TemporaryDirectory(dir=deb_dir) as tmp:
        result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise DebianFetchError(
                f"`apt-get download {package}` failed:\n{result.stderr.strip()}\n"
                "If the package is unknown, run `apt-get update` first; check the name with "
                f"`apt-cache policy {package}`."
            )
        (downloaded,) = Path(tmp).glob("*.deb")
        target = deb_dir / downloaded.name.replace("%3a", "_")
        downloaded.replace(target)  # same filesystem: atomic
    return target


def extract_deb(deb: Path, target: Path, patterns: list[str] | None = None) -> Path:
    """`dpkg -x deb target` (or only the members matching shell `patterns`), cached: an existing tree
    with its completion marker is reused."""
    if (target / DONE_MARKER).exists():
        return target
    if target.exists():
        shutil.rmtree(target)  # left over from an interrupted extraction
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if patterns:
        # Only some members of a large package (e.g. translation catalogs): stream the data tarball.
        command = (
            f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -x -C {shlex.quote(str(tmp))} "
            "--wildcards " + " ".join(shlex.quote(p) for p in patterns)
        )
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    else:
        result = subprocess.run(["dpkg", "-x", str(deb), str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DebianFetchError(f"`dpkg -x {deb}` failed: {result.stderr.strip()}")
    (tmp / DONE_MARKER).write_text(deb.name + "\n")
    tmp.rename(target)
    return target


def fetch_package(package: str, cache_dir: Path, patterns: list[str] | None = None) -> Path:
    """Return the root of `package`'s extracted file tree under `cache_dir`, fetching it if needed."""
    target = cache_dir / "extracted" / (package if not patterns else f"{package}--partial")
    if (target / DONE_MARKER).exists():
        return target
    deb = download_deb(package, cache_dir / "debs")
    return extract_deb(deb, target, patterns)
