"""pablo.conf files and translation tables: read, validate (the same rules as the C
reader in patches/0002), write.

A configuration is one `KEY = value` a line with `#` comments:
MODE (simple|pablo), Q4_0_RADIUS (0..7), TABLE_MODE (off | table name | .table path),
TABLE_DIR (where named tables live; default tables/ beside the file), HIST_OUT (histogram
JSON). Relative paths are relative to the file's directory. The thesis's legacy one-line
form `MODE RADIUS TABLE` (TABLE 0 off, 1 basic, 2 balanced) is accepted too.
A table is 16 lines `code lo hi level`: codes -8..7 in order, contiguous inclusive int8
ranges from -128 to 127, strictly increasing int8 levels.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import paths
from .errors import OrchestrateError

KEYS = ("MODE", "Q4_0_RADIUS", "TABLE_MODE", "TABLE_DIR", "HIST_OUT")
LEGACY_TABLES = {0: "off", 1: "basic", 2: "balanced"}
BUILTIN_TABLES = ("basic", "balanced")
_INT = re.compile(r"[+-]?\d+")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfError(OrchestrateError):
    pass


def _fail(path, line: int, msg: str) -> ConfError:
    where = f"{path}:{line}" if line else f"{path}"
    return ConfError(f"pablo config error: {where}: {msg}")


def _int(text: str, lo: int, hi: int) -> int | None:
    if not _INT.fullmatch(text):
        return None
    v = int(text)
    return v if lo <= v <= hi else None


def _lines(path: Path):
    """(line number, text without comment, stripped) for the non-blank lines."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, 0, f"cannot open: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if s:
            yield n, s


@dataclass(frozen=True)
class Table:
    name: str
    path: Path
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    level: tuple[int, ...]

    def codes(self, q: np.ndarray) -> np.ndarray:
        """Code (-8..7) of each int8 value q."""
        return np.searchsorted(np.array(self.hi), q.astype(np.int16), side="left").astype(np.int8) - 8

    def translate(self, q: np.ndarray) -> np.ndarray:
        """level[code(q)]: what the hooks store for each stock Q8_0 value q."""
        return np.array(self.level, dtype=np.int8)[self.codes(q).astype(np.int16) + 8]


def load_table(path: Path, name: str | None = None) -> Table:
    path = Path(path)
    lo, hi, level = [], [], []
    last = 0
    for n, s in _lines(path):
        tok = s.split()
        if len(tok) != 4:
            raise _fail(path, n, "expected 4 numbers `code lo hi level`")
        vals = [_int(tok[0], -8, 7)] + [_int(t, -1000000, 1000000) for t in tok[1:]]
        if None in vals:
            raise _fail(path, n, "expected 4 integers `code lo hi level` with code in -8..7")
        code, a, b, lev = vals
        k = len(lo)
        if k == 16:
            raise _fail(path, n, "more than 16 codes")
        if code != k - 8:
            raise _fail(path, n, f"codes must run -8..7 in order: expected {k - 8}, got {code}")
        if not (-128 <= a <= 127 and -128 <= b <= 127):
            raise _fail(path, n, f"range [{a}, {b}] is outside int8 (-128..127)")
        if not -128 <= lev <= 127:
            raise _fail(path, n, f"level {lev} is outside int8 (-128..127)")
        if a > b:
            raise _fail(path, n, f"empty range [{a}, {b}]")
        if k == 0 and a != -128:
            raise _fail(path, n, f"the first range must start at -128, not {a}")
        if k and a != hi[-1] + 1:
            kind = "overlap" if a <= hi[-1] else "gap"
            raise _fail(path, n, f"{kind}: range starts at {a} but the previous one ended at {hi[-1]}")
        if k and lev <= level[-1]:
            raise _fail(path, n, f"levels must increase strictly ({lev} after {level[-1]})")
        lo.append(a), hi.append(b), level.append(lev)
        last = n
    if len(lo) < 16:
        raise _fail(path, 0, f"has {len(lo)} codes, a table needs 16 (-8..7)")
    if hi[-1] != 127:
        raise _fail(path, last, f"the last range must end at 127, not {hi[-1]}")
    return Table(name or path.stem, path, tuple(lo), tuple(hi), tuple(level))


@dataclass(frozen=True)
class Conf:
    path: Path
    pablo: bool
    radius: int = 0
    table: Table | None = None
    hist_out: Path | None = None

    @property
    def mode(self) -> str:
        return "pablo" if self.pablo else "simple"


def _resolve(conf_path: Path, rel: str) -> Path:
    return Path(rel) if os.path.isabs(rel) else conf_path.parent / rel


def find_table(value: str, conf_path: Path, table_dir: Path | None, line: int = 0) -> Table:
    """A TABLE_MODE value -> the loaded table (a name in table_dir, or a path)."""
    if "/" in value or value.endswith(".table"):
        tpath = _resolve(conf_path, value)
    else:
        if not _NAME.fullmatch(value):
            raise _fail(conf_path, line, f"bad table name '{value}'")
        tpath = (table_dir or conf_path.parent / "tables") / f"{value}.table"
    if not os.access(tpath, os.R_OK):
        raise _fail(conf_path, line, f"unknown table '{value}': no readable file {tpath}")
    return load_table(tpath, value)


def parse_conf(path: Path) -> Conf:
    path = Path(path)
    seen: dict[str, tuple[int, str]] = {}
    legacy = None
    for count, (n, s) in enumerate(_lines(path), 1):
        if "=" not in s:
            tok = s.split()
            if count > 1 or len(tok) != 3:
                raise _fail(path, n, "expected `KEY = value` (or the legacy one-line form `MODE RADIUS TABLE`)")
            m, r, t = _int(tok[0], 0, 1), _int(tok[1], 0, 7), _int(tok[2], 0, 2)
            if m is None:
                raise _fail(path, n, f"legacy MODE must be 0 (simple) or 1 (pablo), got '{tok[0]}'")
            if r is None:
                raise _fail(path, n, f"legacy RADIUS must be an integer 0..7, got '{tok[1]}'")
            if t is None:
                raise _fail(path, n, f"legacy TABLE must be 0 (off), 1 (basic) or 2 (balanced), got '{tok[2]}'")
            legacy = (n, m, r, t)
            continue
        if legacy:
            raise _fail(path, n, "the legacy one-line form cannot be mixed with `KEY = value` lines")
        key, val = (x.strip() for x in s.split("=", 1))
        if key not in KEYS:
            raise _fail(path, n, f"unknown key '{key}' (known: {', '.join(KEYS)})")
        if key in seen:
            raise _fail(path, n, f"{key} is set twice")
        if not val:
            raise _fail(path, n, f"{key} has no value")
        seen[key] = (n, val)
    if legacy:
        n, m, r, t = legacy
        table = None if t == 0 else find_table(LEGACY_TABLES[t], path, None, n)
        return Conf(path, m == 1, r, table)
    if "MODE" not in seen:
        raise _fail(path, 0, "MODE is missing (MODE = simple or MODE = pablo)")
    n, mode = seen["MODE"]
    if mode not in ("simple", "pablo"):
        raise _fail(path, n, f"MODE must be 'simple' or 'pablo', got '{mode}'")
    radius = 0
    if "Q4_0_RADIUS" in seen:
        n, val = seen["Q4_0_RADIUS"]
        radius = _int(val, 0, 7)
        if radius is None:
            raise _fail(path, n, f"Q4_0_RADIUS must be an integer 0..7, got '{val}'")
    table_dir = _resolve(path, seen["TABLE_DIR"][1]) if "TABLE_DIR" in seen else None
    table = None
    if "TABLE_MODE" in seen and seen["TABLE_MODE"][1] != "off":
        n, val = seen["TABLE_MODE"]
        table = find_table(val, path, table_dir, n)
    hist = _resolve(path, seen["HIST_OUT"][1]) if "HIST_OUT" in seen else None
    return Conf(path, mode == "pablo", radius, table, hist)


def table_arg(value: str) -> Table:
    """--table NAME|FILE on the command line: a built-in name or a table file."""
    if "/" in value or value.endswith(".table") or Path(value).is_file():
        return load_table(Path(value))
    path = paths.conf_dir() / "tables" / f"{value}.table"
    if not path.exists():
        known = sorted(p.stem for p in (paths.conf_dir() / "tables").glob("*.table"))
        raise OrchestrateError(f"unknown table '{value}' (known: {', '.join(known)}; or give a .table file)")
    return load_table(path, value)


def write_conf(path: Path, pablo: bool, radius: int = 0, table: Table | None = None,
               hist_out: Path | None = None) -> Path:
    """Write a configuration with absolute paths (atomically)."""
    lines = ["# written by orchestrate", f"MODE = {'pablo' if pablo else 'simple'}", f"Q4_0_RADIUS = {radius}"]
    if table is None:
        lines.append("TABLE_MODE = off")
    elif Path(table.path).name == f"{table.name}.table" and _NAME.fullmatch(table.name):
        # by name, so the histograms record "balanced" rather than a path
        lines += [f"TABLE_DIR = {Path(table.path).resolve().parent}", f"TABLE_MODE = {table.name}"]
    else:
        lines.append(f"TABLE_MODE = {Path(table.path).resolve()}")
    if hist_out:
        lines.append(f"HIST_OUT = {Path(hist_out).resolve()}")
    from .assets import write_atomic
    path = Path(path)
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path
