"""pablo.conf files and translation tables: read, validate, write.

The reader applies exactly the rules of the fork's C reader (patches/0001,
ggml/src/ggml-pablo-conf.c), with the same messages, so that `orchestrate conf check` and
llama-quantize always give the same verdict; tests/test_conf_differential.py holds the two
to each other on generated files. Both read bytes, whatever the locale: a leading UTF-8
byte-order mark is skipped; a NUL byte, a line over 4096 bytes, a directory or a read
error is an error; `#` starts a comment; space is ASCII space, tab, CR, VT and FF.

A configuration is one `KEY = value` a line:
MODE (simple|pablo), Q4_0_RADIUS (0..7), TABLE_MODE (off | table name | .table path),
TABLE_DIR (where named tables live; default tables/ beside the file), HIST_OUT (histogram
JSON, checked to be writable), and TENSOR = PATTERN [Q4_0_RADIUS=N] [TABLE_MODE=T], repeatable:
the radius and/or table of the tensors whose names match PATTERN (`*` any run of bytes, `?` one
byte, printable ASCII other than `=`); the first matching rule wins, the file's own keys are the
default. Relative paths are relative to the file's directory. The
thesis's legacy one-line form `MODE RADIUS TABLE` (TABLE 0 off, 1 basic, 2 balanced) is
accepted too. A table is 16 lines `code lo hi level`: codes -8..7 in order, contiguous
inclusive int8 ranges from -128 to 127, strictly increasing int8 levels.
"""

import errno
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import OrchestrateError
from ..files import check_not_special, write_atomic

KEYS = (b"MODE", b"Q4_0_RADIUS", b"TABLE_MODE", b"TABLE_DIR", b"HIST_OUT", b"TENSOR")
LEGACY_TABLES = {0: b"off", 1: b"basic", 2: b"balanced"}
LINE_MAX = 4096     # bytes in a line, without its newline
NAME_MAX = 255      # bytes in a TABLE_MODE value
PATH_MAX = 4096     # bytes in a resolved path, with the C reader's terminating NUL
PATTERN_MAX = 255   # bytes in a TENSOR pattern
RULES_MAX = 4096    # TENSOR rules in a file
BOM = b"\xef\xbb\xbf"
_INT = re.compile(rb"[+-]?[0-9]+")
_NAME = re.compile(rb"[A-Za-z0-9_-]+")
_TOKENS = re.compile(rb"[ \t]+")


class ConfError(OrchestrateError):
    pass


def _s(b: bytes) -> str:
    """Bytes shown as they are (undecodable bytes kept via surrogateescape, as in file names)."""
    return os.fsdecode(b)


def _fail(path: bytes, line: int, msg: str) -> ConfError:
    where = f"{_s(path)}:{line}" if line > 0 else _s(path)
    return ConfError(f"pablo config error: {where}: {msg}")


def _int(text: bytes, lo: int, hi: int) -> int | None:
    if not _INT.fullmatch(text):
        return None
    v = int(text)
    return v if lo <= v <= hi else None


def _resolve(conf: bytes, rel: bytes) -> bytes | None:
    """The C reader's join: rel as is when absolute or when conf has no directory part,
    else conf's directory + / + rel. None when it would not fit the C reader's buffer."""
    slash = conf.rfind(b"/")
    out = rel if rel.startswith(b"/") or slash < 0 else conf[:slash] + b"/" + rel
    return out if len(out) < PATH_MAX else None


def _lines(path: bytes):
    """(line number, line without comment, stripped) for every line, as the C reader reads them."""
    if os.path.isdir(path):
        raise _fail(path, 0, f"cannot open: {os.strerror(errno.EISDIR)}")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _fail(path, 0, f"cannot open: {e.strerror}") from None
    with f:
        n = 0
        while True:
            try:
                raw = f.readline(LINE_MAX + 1)
            except OSError as e:
                raise _fail(path, n + 1, f"read error: {e.strerror}") from None
            if not raw:
                return
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if len(line) > LINE_MAX:
                raise _fail(path, n + 1, f"line too long (more than {LINE_MAX} bytes)")
            n += 1
            if b"\0" in line:
                raise _fail(path, n, "NUL byte in the line")
            if n == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            yield n, line.split(b"#", 1)[0].strip()


def _tokens(s: bytes) -> list[bytes]:
    return [t for t in _TOKENS.split(s) if t]


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


def load_table(path: Path | bytes, name: str | None = None) -> Table:
    p = os.fsencode(path)
    lo, hi, level = [], [], []
    last = 0
    for n, s in _lines(p):
        if not s:
            continue
        tok = _tokens(s)
        if len(tok) != 4:
            raise _fail(p, n, "expected 4 numbers `code lo hi level`")
        vals = [_int(tok[0], -8, 7)] + [_int(t, -1000000, 1000000) for t in tok[1:]]
        if None in vals:
            raise _fail(p, n, "expected 4 integers `code lo hi level` with code in -8..7")
        code, a, b, lev = vals
        k = len(lo)
        if k == 16:
            raise _fail(p, n, "more than 16 codes")
        if code != k - 8:
            raise _fail(p, n, f"codes must run -8..7 in order: expected {k - 8}, got {code}")
        if not (-128 <= a <= 127 and -128 <= b <= 127):
            raise _fail(p, n, f"range [{a}, {b}] is outside int8 (-128..127)")
        if not -128 <= lev <= 127:
            raise _fail(p, n, f"level {lev} is outside int8 (-128..127)")
        if a > b:
            raise _fail(p, n, f"empty range [{a}, {b}]")
        if k == 0 and a != -128:
            raise _fail(p, n, f"the first range must start at -128, not {a}")
        if k and a != hi[-1] + 1:
            kind = "overlap" if a <= hi[-1] else "gap"
            raise _fail(p, n, f"{kind}: range starts at {a} but the previous one ended at {hi[-1]}")
        if k and lev <= level[-1]:
            raise _fail(p, n, f"levels must increase strictly ({lev} after {level[-1]})")
        lo.append(a), hi.append(b), level.append(lev)
        last = n
    if len(lo) < 16:
        raise _fail(p, 0, f"has {len(lo)} codes, a table needs 16 (-8..7)")
    if hi[-1] != 127:
        raise _fail(p, last, f"the last range must end at 127, not {hi[-1]}")
    return Table(name or Path(_s(p)).stem, Path(_s(p)), tuple(lo), tuple(hi), tuple(level))


def glob_match(pattern: str, name: str) -> bool:
    """The C reader's whole-name match, by its algorithm: `*` any run of bytes (also none), `?` one
    byte, the rest itself; on a mismatch, back to the last `*` only. Time grows with the pattern's
    length times the name's (a regular expression takes exponential time on a pattern of many `*`)."""
    pat, s = pattern.encode("ascii"), name.encode("utf-8", "surrogateescape")
    i = j = 0
    star = back = -1
    while j < len(s):
        if i < len(pat) and (pat[i] == ord("?") or (pat[i] != ord("*") and pat[i] == s[j])):
            i, j = i + 1, j + 1
        elif i < len(pat) and pat[i] == ord("*"):
            star, back, i = i, j, i + 1
        elif star >= 0:
            back += 1
            i, j = star + 1, back
        else:
            return False
    while i < len(pat) and pat[i] == ord("*"):
        i += 1
    return i == len(pat)


@dataclass(frozen=True)
class Rule:
    """TENSOR = PATTERN [Q4_0_RADIUS=N] [TABLE_MODE=T]: None where the rule leaves the file's value."""
    pattern: str
    line: int = 0
    radius: int | None = None
    table_set: bool = False      # TABLE_MODE given (then table None means off)
    table: Table | None = None
    table_file: str | None = None

    def matches(self, name: str) -> bool:
        return glob_match(self.pattern, name)


def rule_for(rules, name: str) -> int | None:
    """Index of the first rule whose pattern matches the tensor `name`, or None."""
    return next((i for i, r in enumerate(rules) if r.matches(name)), None)


@dataclass(frozen=True)
class Conf:
    path: Path
    experiment: bool  # MODE = pablo: the experiments' mode (else simple: stock values)
    radius: int = 0
    table: Table | None = None
    # the table's and the histograms' files as the fork's reader joins them (not normalised: the
    # differential test compares them with the C reader's as written)
    table_file: str | None = None
    hist_out: str | None = None
    rules: tuple[Rule, ...] = ()

    @property
    def mode(self) -> str:
        return "pablo" if self.experiment else "simple"


def _find_table(value: bytes, conf: bytes, table_dir: bytes | None, line: int) -> tuple[Table, str]:
    """A TABLE_MODE value -> the loaded table (a name in table_dir, or a path) and its file as joined."""
    if b"/" in value or (len(value) > 6 and value.endswith(b".table")):
        tpath = _resolve(conf, value)
    else:
        if not _NAME.fullmatch(value):
            raise _fail(conf, line, f"bad table name '{_s(value)}'")
        tpath = (table_dir or _resolve(conf, b"tables")) + b"/" + value + b".table"
        tpath = tpath if len(tpath) < PATH_MAX else None
    if tpath is None:
        raise _fail(conf, line, "table path too long")
    if not os.access(tpath, os.R_OK):
        raise _fail(conf, line, f"unknown table '{_s(value)}': no readable file {_s(tpath)}")
    return load_table(tpath, _s(value)), _s(tpath)


def _check_hist_out(conf: bytes, line: int, hist: bytes) -> None:
    """HIST_OUT must be writable before anything is quantized (the C reader's probe)."""
    if os.path.isdir(hist):
        raise _fail(conf, line, f"HIST_OUT {_s(hist)} is a directory")
    tmp = hist + b".tmp"
    try:
        with open(tmp, "wb"):
            pass
    except OSError as e:
        raise _fail(conf, line, f"HIST_OUT {_s(hist)} cannot be written: {e.strerror}") from None
    os.remove(tmp)


def _parse_rule(p: bytes, n: int, val: bytes, count: int) -> tuple[Rule, bytes | None]:
    """One TENSOR value (after `count` rules) -> the rule, its table not yet found, and its TABLE_MODE
    value as written. The checks come in the C reader's order."""
    tok = _tokens(val)
    if len(tok) < 2:
        raise _fail(p, n, "TENSOR needs a pattern and a setting, as in `TENSOR = blk.*.ffn_down.weight Q4_0_RADIUS=2`")
    if len(tok) > 3:
        raise _fail(p, n, "TENSOR takes a pattern and at most two settings (Q4_0_RADIUS=N, TABLE_MODE=T)")
    pattern = tok[0]
    if len(pattern) > PATTERN_MAX or any(not 0x20 < c < 0x7F or c == 0x3D for c in pattern):
        raise _fail(p, n, f"bad tensor pattern '{_s(pattern)}' (at most {PATTERN_MAX} bytes of printable ASCII "
                          "other than '=')")
    if count == RULES_MAX:
        raise _fail(p, n, f"more than {RULES_MAX} TENSOR rules")
    radius, table_val = None, None
    for setting in tok[1:]:
        key, eq, v = setting.partition(b"=")
        if not eq or key not in (b"Q4_0_RADIUS", b"TABLE_MODE"):
            raise _fail(p, n, f"unknown rule setting '{_s(key)}' (known: Q4_0_RADIUS=N, TABLE_MODE=T)")
        if (radius if key == b"Q4_0_RADIUS" else table_val) is not None:
            raise _fail(p, n, f"{key.decode()} is set twice in one rule")
        if not v:
            raise _fail(p, n, f"{key.decode()} has no value")
        if key == b"Q4_0_RADIUS":
            radius = _int(v, 0, 7)
            if radius is None:
                raise _fail(p, n, f"Q4_0_RADIUS must be an integer 0..7, got '{_s(v)}'")
        else:
            if len(v) > NAME_MAX:
                raise _fail(p, n, f"TABLE_MODE value too long (more than {NAME_MAX} bytes)")
            table_val = v
    return Rule(pattern.decode("ascii"), n, radius, table_val is not None), table_val


def parse_conf(path: Path | bytes) -> Conf:
    p = os.fsencode(path)
    seen: set[bytes] = set()
    experiment, radius, table_val, table_line, table_dir, hist, hist_line = False, 0, b"off", 0, None, None, 0
    legacy, count = False, 0
    rules: list[tuple[Rule, bytes | None]] = []
    for n, s in _lines(p):
        if not s:
            continue
        count += 1
        if b"=" not in s:
            tok = _tokens(s)
            if count > 1 or len(tok) != 3:
                raise _fail(p, n, "expected `KEY = value` (or the legacy one-line form `MODE RADIUS TABLE`)")
            m, r, t = _int(tok[0], 0, 1), _int(tok[1], 0, 7), _int(tok[2], 0, 2)
            if m is None:
                raise _fail(p, n, f"legacy MODE must be 0 (simple) or 1 (pablo), got '{_s(tok[0])}'")
            if r is None:
                raise _fail(p, n, f"legacy RADIUS must be an integer 0..7, got '{_s(tok[1])}'")
            if t is None:
                raise _fail(p, n, f"legacy TABLE must be 0 (off), 1 (basic) or 2 (balanced), got '{_s(tok[2])}'")
            experiment, radius, table_val, table_line, legacy = m == 1, r, LEGACY_TABLES[t], n, True
            continue
        if legacy:
            raise _fail(p, n, "the legacy one-line form cannot be mixed with `KEY = value` lines")
        key, _, val = s.partition(b"=")
        key, val = key.strip(), val.strip()
        if key == b"TENSOR":  # repeatable, in order
            rules.append(_parse_rule(p, n, val, len(rules)))
            continue
        if key not in KEYS:
            raise _fail(p, n, f"unknown key '{_s(key)}' (known: {', '.join(k.decode() for k in KEYS)})")
        if key in seen:
            raise _fail(p, n, f"{key.decode()} is set twice")
        seen.add(key)
        if not val:
            raise _fail(p, n, f"{key.decode()} has no value")
        if key == b"MODE":
            if val not in (b"simple", b"pablo"):
                raise _fail(p, n, f"MODE must be 'simple' or 'pablo', got '{_s(val)}'")
            experiment = val == b"pablo"
        elif key == b"Q4_0_RADIUS":
            radius = _int(val, 0, 7)
            if radius is None:
                raise _fail(p, n, f"Q4_0_RADIUS must be an integer 0..7, got '{_s(val)}'")
        elif key == b"TABLE_MODE":
            if len(val) > NAME_MAX:
                raise _fail(p, n, f"TABLE_MODE value too long (more than {NAME_MAX} bytes)")
            table_val, table_line = val, n
        elif key == b"TABLE_DIR":
            table_dir = _resolve(p, val)
            if table_dir is None:
                raise _fail(p, n, "TABLE_DIR path too long")
        else:
            hist, hist_line = _resolve(p, val), n
            if hist is None:
                raise _fail(p, n, "HIST_OUT path too long")
    if not legacy and b"MODE" not in seen:
        raise _fail(p, 0, "MODE is missing (MODE = simple or MODE = pablo)")
    table, table_file = (None, None) if table_val == b"off" else _find_table(table_val, p, table_dir, table_line)
    found = []
    for rule, value in rules:
        if value not in (None, b"off"):
            rule_table, rule_file = _find_table(value, p, table_dir, rule.line)
            rule = replace(rule, table=rule_table, table_file=rule_file)
        found.append(rule)
    if hist is not None:
        _check_hist_out(p, hist_line, hist)
    return Conf(Path(_s(p)), experiment, radius, table, table_file, _s(hist) if hist is not None else None,
                tuple(found))


MAX_TABLE_BYTES = 1 << 16  # 16 lines and their comments: anything near this is a mistake


def table_arg(value: str, relative_to: Path | None = None) -> Table:
    """A table named by the user: a built-in name (conf/tables), or a .table file (relative to
    `relative_to`, default the current directory; `~` expanded)."""
    path = Path(relative_to or Path.cwd()) / Path(value).expanduser()
    if "/" in value or value.endswith(".table") or path.is_file():
        check_not_special(path, "table")
        if path.is_file() and path.stat().st_size > MAX_TABLE_BYTES:
            raise OrchestrateError(f"table {path} is {path.stat().st_size} bytes; a table file is at most "
                                   f"{MAX_TABLE_BYTES}")
        return load_table(path)
    builtin = paths.conf_dir() / "tables" / f"{value}.table"
    if not builtin.exists():
        known = sorted(p.stem for p in (paths.conf_dir() / "tables").glob("*.table"))
        raise OrchestrateError(f"unknown table '{value}' (known: {', '.join(known)}; or give a .table file)")
    return load_table(builtin, value)


def rule_arg(text: str, relative_to: Path | None = None) -> Rule:
    """A rule given on the command line, `PATTERN [Q4_0_RADIUS=N] [TABLE_MODE=T]` (the file's TENSOR
    grammar); its table is a built-in name or a .table file, as for --table."""
    try:
        rule, value = _parse_rule(b"", 0, os.fsencode(text), 0)
    except ConfError as e:
        raise OrchestrateError(f"rule '{text}': {str(e).split(': ', 2)[2]}") from None
    if value in (None, b"off"):
        return rule
    table = table_arg(_s(value), relative_to)
    return replace(rule, table=table, table_file=str(table.path))


@dataclass(frozen=True)
class Hooks:
    """What the hooks do to the values while quantizing: nothing (stock values), or the experiments
    (`MODE = pablo` in the file) with a zero radius for Q4_0 and a translation table for Q8_0, and
    per-tensor rules that set them for the tensors they match."""
    experiment: bool = False
    radius: int = 0
    table: Table | None = None
    rules: tuple[Rule, ...] = ()

    def __post_init__(self):
        if (self.radius or self.table is not None or self.rules) and not self.experiment:
            what = "a translation table" if self.table is not None else "a radius" if self.radius else "a rule"
            raise OrchestrateError(f"{what} takes effect only in the experiment mode (--mode pablo)")

    @property
    def mode(self) -> str:
        return "pablo" if self.experiment else "simple"  # the configuration file's word, kept as it was


STOCK = Hooks()


def write_conf(path: Path, hooks: Hooks, hist_out: Path | None = None) -> Path:
    """Write a configuration with absolute paths (atomically)."""
    radius, table = hooks.radius, hooks.table
    def value(p: Path) -> str:
        text = str(Path(p).resolve())
        if "#" in text or "\n" in text or len(os.fsencode(text)) >= PATH_MAX:
            raise OrchestrateError(f"{text}: a path with '#', a newline or over {PATH_MAX - 1} bytes cannot be "
                                   "written into a pablo.conf; move or rename it")
        return text
    lines = ["# written by orchestrate", f"MODE = {hooks.mode}", f"Q4_0_RADIUS = {radius}"]
    if table is None:
        lines.append("TABLE_MODE = off")
    elif Path(table.path).name == f"{table.name}.table" and _NAME.fullmatch(os.fsencode(table.name)):
        # by name, so the histograms record "balanced" rather than a path
        lines += [f"TABLE_DIR = {value(Path(table.path).parent)}", f"TABLE_MODE = {table.name}"]
    else:
        lines.append(f"TABLE_MODE = {value(table.path)}")
    if hist_out:
        lines.append(f"HIST_OUT = {value(hist_out)}")
    for r in hooks.rules:
        settings = [f"Q4_0_RADIUS={r.radius}"] if r.radius is not None else []
        if r.table_set:
            path_ = "off" if r.table is None else value(r.table.path)
            if any(c.isspace() for c in path_):
                raise OrchestrateError(f"{path_}: a table path with a space cannot be written into a TENSOR rule; "
                                       "move or rename it")
            settings.append(f"TABLE_MODE={path_}")
        lines.append(f"TENSOR = {r.pattern} {' '.join(settings)}")
    path = Path(path)
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return path
