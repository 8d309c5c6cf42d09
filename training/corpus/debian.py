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


def download_deb(package: str, deb_dir: Path, apt_options: list[str] | None = None) -> Path:
    """Download `package`'s .deb into `deb_dir` (reusing one already there) and return its path.
    `apt_options` (e.g. a private sid configuration, `suite_apt_options`) go to apt-get."""
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
        command = ["apt-get", *(apt_options or []), "download", package]
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
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


def fetch_package(
    package: str, cache_dir: Path, patterns: list[str] | None = None, suite: str | None = None
) -> Path:
    """Return the root of `package`'s extracted file tree under `cache_dir`, fetching it if needed.
    `suite` (e.g. "sid") fetches from another Debian suite than the system's, without installing it."""
    name = package if not patterns else f"{package}--partial"
    if suite is not None:
        name = f"{name}--{suite}"
    target = cache_dir / "extracted" / name
    if (target / DONE_MARKER).exists():
        return target
    options = suite_apt_options(suite, cache_dir) if suite is not None else None
    deb = download_deb(package, cache_dir / "debs" / (suite or ""), options)
    return extract_deb(deb, target, patterns)


def system_archive_uri() -> str:
    """The Debian archive URI this machine's apt already uses (the first `URIs:` / `deb` entry that is
    not the security archive): other suites are fetched from the same place."""
    uris = []
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                uris += line.split()[1:]
            elif line.startswith("deb "):
                uris += [word for word in line.split()[1:] if "://" in word][:1]
    archive = [uri for uri in uris if "security" not in uri]
    if not archive:
        raise DebianFetchError(
            "no Debian archive found in /etc/apt sources: cannot fetch packages of another suite"
        )
    return archive[0].rstrip("/")


def suite_apt_options(suite: str, cache_dir: Path, languages: list[str] | None = None) -> list[str]:
    """apt-get options for a private, download-only view of `suite` (its package lists live in the cache;
    the system's apt state is untouched). The lists are fetched once. `languages` (apt codes such as
    `fr`, `zh_CN`) also fetches the translated package descriptions (`Translation-xx`)."""
    root = Path(cache_dir) / (f"apt-{suite}" + (f"-{'-'.join(languages)}" if languages else ""))
    lists = root / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    if not sources.exists():
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        sources.write_text(f"deb [signed-by={keyring}] {system_archive_uri()} {suite} main\n")
    options = [
        *(["-o", f"Acquire::Languages={','.join(languages)}"] if languages else []),
        "-o",
        f"Dir::State::Lists={lists}",
        "-o",
        f"Dir::Etc::sourcelist={sources}",
        "-o",
        "Dir::Etc::sourceparts=-",
        "-o",
        "APT::Get::List-Cleanup=0",
    ]
    if not any(lists.glob("*Packages*")):
        result = subprocess.run(["apt-get", "-q", *options, "update"], capture_output=True, text=True)
        if result.returncode != 0 or not any(lists.glob("*Packages*")):
            raise DebianFetchError(
                f"could not fetch the package lists of Debian {suite}: {result.stderr.strip()[-500:]}"
            )
    return options
