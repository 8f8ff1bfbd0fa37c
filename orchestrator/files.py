"""Reading and writing the tool's own files: always UTF-8, always atomic.

Every file orchestrate writes goes through write_atomic: a temporary file beside the
target, renamed over it when complete, removed if anything fails, and given the mode a
plain open() would have given it (0666 less the umask), so a reader never sees half a
file and nothing half-written is left behind.
"""

import json
import os
import tempfile
from pathlib import Path

ENCODING = "utf-8"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(dest: Path, data: bytes | str) -> Path:
    dest = Path(dest)
    if isinstance(data, str):
        data = data.encode(ENCODING)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def check_writable(path: Path, what: str) -> Path:
    """Fail now, in one line, when `path` could not be written as a file later (rather than
    after hours of work). Creates nothing: missing directories are made when it is written."""
    from .errors import OrchestrateError
    path = Path(path)
    if path.is_dir():
        raise OrchestrateError(f"{what} {path} is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OrchestrateError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OrchestrateError(f"{what} {path}: {parent} is not writable")
    return path


def read_text(path: Path) -> str:
    """A text file as UTF-8 whatever the locale (undecodable bytes shown, not fatal)."""
    return Path(path).read_text(encoding=ENCODING, errors="replace")


def write_json(path: Path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding=ENCODING))
