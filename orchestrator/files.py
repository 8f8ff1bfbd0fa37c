"""Reading and writing the tool's own files: always UTF-8, always atomic.

Every file orchestrate writes goes through write_atomic: a temporary file beside the
target, renamed over it when complete, removed if anything fails, and given the mode a
plain open() would have given it (0666 less the umask), so a reader never sees half a
file and nothing half-written is left behind.
"""

import json
import os
import re
import stat
import tempfile
from pathlib import Path

ENCODING = "utf-8"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(dest: Path, data: bytes | str) -> Path:
    dest = Path(dest)
    if isinstance(data, str):  # (a path's undecodable bytes, held as surrogates, are written as they were)
        data = data.encode(ENCODING, "surrogateescape")
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


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_DIR = ((stat.S_ISDIR, "a directory"),)


def _refuse_kind(path: Path, mode: int, what: str, kinds) -> None:
    from .errors import OrchestrateError
    for test, kind in kinds:
        if test(mode):
            raise OrchestrateError(f"{what} {path} is {kind}, not a regular file")


def check_not_special(path: Path, what: str) -> Path:
    """A one-line error when path is a FIFO, socket or device (reading one would block or never end);
    anything else, a directory too, is left to the reader, which says what it says of it."""
    try:
        _refuse_kind(path, Path(path).stat().st_mode, what, _SPECIAL)
    except OSError:
        pass
    return Path(path)


def check_input_file(path: Path, what: str) -> Path:
    """`path` as a regular file that can be read, or a one-line error that says what it is instead
    (missing, a directory, a FIFO, a device, a symlink loop, unreadable)."""
    from .errors import OrchestrateError
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        dangling = path.is_symlink()
        raise OrchestrateError(f"{what} {path} " + ("is a symlink to nothing" if dangling else "does not exist")) from None
    except OSError as e:  # ELOOP, ENAMETOOLONG, EACCES on a parent, ...
        raise OrchestrateError(f"{what} {path}: {e.strerror}") from None
    _refuse_kind(path, mode, what, _SPECIAL + _DIR)
    if not os.access(path, os.R_OK):
        raise OrchestrateError(f"{what} {path} is not readable (permission denied)")
    return path


def same_file(a: Path, b: Path) -> bool:
    """True when a and b are one file: the same path once resolved, or the same device and inode
    (a symlink or a hard link to it)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the resolved paths could tell
        return False


def refuse_overwrite(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Fail in one line, before anything runs, when an output is one of the inputs (or two outputs
    are one file): no command writes over a file it reads."""
    from .errors import OrchestrateError
    outs = [(w, Path(p)) for w, p in outputs.items() if p is not None]
    for what, out in outs:
        for src_what, src in inputs.items():
            if src is not None and same_file(out, src):
                raise OrchestrateError(f"the {what} {out} is the {src_what} {src}: it would be overwritten; "
                                       "give another output path")
    for i, (what, out) in enumerate(outs):
        for other, path in outs[i + 1:]:
            if same_file(out, path):
                raise OrchestrateError(f"the {what} and the {other} are one file ({out}); give two paths")


# A name that becomes one path component under an output directory or the cache: nothing that climbs
# out of it (/, ..), hides (a leading dot), reads as an option (a leading dash) or breaks a line.
SAFE_NAME = re.compile(r"[^/\x00-\x1f\x7f.\-][^/\x00-\x1f\x7f]{0,99}")


def check_name(name: str, what: str) -> str:
    """name, when it can be one file name under a directory (and in the JSON that names it)."""
    from .errors import OrchestrateError
    if printable(name) != name:
        raise OrchestrateError(f"{what} {printable(name)!r} is not valid UTF-8: rename what it comes from")
    if not SAFE_NAME.fullmatch(name):
        raise OrchestrateError(f"{what} {name!r} cannot name a file: 1-100 characters without '/' or control "
                               "characters, not starting with '.' or '-'")
    return name


def read_text(path: Path) -> str:
    """A text file as UTF-8 whatever the locale (undecodable bytes shown, not fatal)."""
    return Path(path).read_text(encoding=ENCODING, errors="replace")


def write_json(path: Path, data) -> Path:
    text = json.dumps(data, indent=1, ensure_ascii=False)
    try:
        text.encode(ENCODING)
    except UnicodeEncodeError:  # a path's undecodable bytes (surrogates): escaped, so they read back exactly
        text = json.dumps(data, indent=1)
    return write_atomic(path, text)


def memoized(path: Path, compute, use=lambda value: value):
    """use(a JSON value kept at path): read when it is there and well formed, else compute()d now and
    kept. For facts that are costly to learn and fixed by what the path's name holds (a file's content,
    a build's id)."""
    try:
        return use(read_json(path))
    except (OSError, ValueError, KeyError, TypeError):  # absent, half-written by an old version, another shape
        pass
    value = compute()
    write_json(path, value)
    return use(value)


def taken_now(lock) -> bool:
    """Acquire a filelock lock if no one holds it; False (not waiting) when someone does."""
    import filelock
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return False
    return True


def printable(text: str) -> str:
    """text with what UTF-8 cannot hold (a path's undecodable bytes) written as backslash escapes."""
    return text.encode(ENCODING, "backslashreplace").decode(ENCODING)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding=ENCODING))


def read_document(directory: Path, name: str, schema: str, what: str) -> dict:
    """The JSON document `name` of an output directory, checked to carry `schema` (one-line errors)."""
    from .errors import OrchestrateError
    path = Path(directory) / name
    if not path.exists():
        raise OrchestrateError(f"{directory} has no {name} (not a {what} directory)")
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise OrchestrateError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise OrchestrateError(f"{path} is not a {what} document of this version ({schema})")
    return doc
