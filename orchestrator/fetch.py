"""Fetch pinned packages from the package registry with pip and verify their sha256.

pip is used (not a hand-written HTTP client) so the user's index, mirror and proxy
settings apply. Archives are cached outside the repository and verified on every use.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import paths, stream
from .errors import OrchestrateError

logger = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    """sha256 of a file, read once and left out of the page cache (stream.py)."""
    h = hashlib.sha256()
    for block in stream.read_span(path, 0, os.path.getsize(path)):
        h.update(block)
    return h.hexdigest()


def verify(path: Path, sha256: str) -> None:
    got = sha256_of(path)
    if got != sha256:
        raise OrchestrateError(
            f"sha256 mismatch for {path}: expected {sha256}, got {got} "
            "(delete the file to download it again, or fix the pin)"
        )


def fetch_package(package: str, version: str, filename: str, sha256: str | None, sdist: bool) -> Path:
    """Return the cached, verified archive `filename` of package==version.

    With sha256=None the archive is not verified (only for one-off checks against
    another version); the caller must say so to the user.
    """
    dest = paths.cache_dir() / "downloads" / filename
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        logger.info(f"downloading {package}=={version} from the package index ...")
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--dest", tmp, f"{package}=={version}"]
            cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / filename
            if res.returncode != 0 or not got.exists():
                last = (res.stderr.strip().splitlines() or ["no output"])[-1]
                raise OrchestrateError(f"could not download {package}=={version} ({filename}): {last}")
            if sha256:
                verify(got, sha256)
            shutil.move(str(got), dest)  # same filesystem: an atomic rename
    if sha256:
        verify(dest, sha256)
    return dest
