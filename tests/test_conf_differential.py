"""The fork's C pablo.conf reader and orchestrate's Python reader agree on every input.

The C side is the real ggml-pablo-conf.c from the patched vendor tree, compiled with
AddressSanitizer and UndefinedBehaviorSanitizer into a small harness
(tests/harness/pablo_conf_harness.c) that reads paths on stdin. Hypothesis generates the
files: random bytes, configurations built from every key, value and table rule (with BOMs,
NUL bytes, Latin-1, CR/VT/FF, over-long lines and values, directories, unwritable
HIST_OUT), and byte-level mutations of valid files. Every file must get the same verdict,
the same message or the same parsed values, and the sanitizers must report nothing.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import paths
from orchestrator.hooks import conf

HERE = Path(__file__).resolve().parent
TABLES = HERE.parent / "conf" / "tables"
EXAMPLES = 2600          # per test below; six tests: over 10,000 files in all
COUNT = {"files": 0, "accepted": 0, "rejected": 0, "disagreements": []}
FLOOR = 1_000  # accepted and rejected files each, at least: a generator of almost only errors would not do

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def harness_exe(fork, tmp_path_factory):
    """The C reader compiled with the sanitizers into the harness."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to build the C reader's harness")
    work = tmp_path_factory.mktemp("diff")
    ggml = paths.vendor_dir() / "ggml"
    exe = work / "harness"
    cc = subprocess.run(["gcc", "-std=gnu11", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                         "-fno-omit-frame-pointer", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
                         str(HERE / "harness" / "pablo_conf_harness.c"), str(ggml / "src" / "ggml-pablo-conf.c"),
                         "-o", str(exe)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return exe


@pytest.fixture
def harness(harness_exe, tmp_path):
    """The sanitized C reader, running for one test; when the test's files are done its input ends, and
    its exit and stderr (ASan/UBSan reports, leaks, which show at exit) are checked for that test."""
    root = tmp_path / "root"
    root.mkdir()
    stderr = open(tmp_path / "stderr.txt", "w+b")
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    proc = subprocess.Popen([str(harness_exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                            cwd=root, env=env)
    yield {"proc": proc, "root": root, "stderr": stderr}
    proc.stdin.close()
    rc = proc.wait(timeout=120)
    stderr.seek(0)
    reports = stderr.read().decode("utf-8", "replace")
    assert rc == 0 and reports == "", f"harness exit {rc}; sanitizer output:\n{reports[:4000]}"


def c_verdict(h, path: bytes) -> list[bytes]:
    h["proc"].stdin.write(path + b"\n")
    h["proc"].stdin.flush()
    line = h["proc"].stdout.readline()
    assert line.endswith(b"\n"), f"the harness died on {path!r}"
    return line[:-1].split(b"\0")


def py_verdict(path: bytes) -> list[bytes]:
    try:
        c = conf.parse_conf(path)
    except conf.ConfError as e:
        return [b"E", os.fsencode(str(e))]
    ints = lambda v: ",".join(map(str, v)).encode()  # noqa: E731
    t = c.table
    fields = [b"K", c.mode.encode(), str(c.radius).encode()]
    fields += [os.fsencode(t.name), os.fsencode(c.table_file), ints(t.lo), ints(t.hi), ints(t.level)] if t else \
        [b"off", b"", b"", b"", b""]
    fields += [os.fsencode(c.hist_out) if c.hist_out else b""]  # paths as written, not normalised
    for r in c.rules:
        fields += [r.pattern.encode(), str(r.line).encode(), b"-" if r.radius is None else str(r.radius).encode()]
        t = r.table
        fields += [os.fsencode(t.name), os.fsencode(r.table_file), ints(t.lo), ints(t.hi), ints(t.level)] if t else \
            [b"off" if r.table_set else b"-", b"", b"", b"", b""]
    return fields


def compare(h, files: dict[str, bytes], target: str = "pablo.conf", relative: bool = False) -> None:
    """Lay the files down under a clean root, ask both readers about `target`, compare."""
    root: Path = h["root"]
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (root / "tables").mkdir()
    (root / "sub").mkdir()  # a directory where a file is expected
    for name in ("basic", "balanced"):
        shutil.copy(TABLES / f"{name}.table", root / "tables" / f"{name}.table")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    path = target.encode() if relative else os.fsencode(root / target)
    cwd = os.getcwd()
    os.chdir(root)  # the harness runs in root: relative names mean the same to both
    try:
        py = py_verdict(path)
    finally:
        os.chdir(cwd)
    c = c_verdict(h, path)
    COUNT["files"] += 1
    COUNT["accepted" if c[0] == b"K" else "rejected"] += 1
    if c != py:
        COUNT["disagreements"].append((files, target, c, py))
    assert c == py, f"C and Python disagree on {files!r}:\n  C:  {c!r}\n  Py: {py!r}"


# ---- what files are made of ---------------------------------------------------------------

SPACE = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t ", b"\r", b"\v", b"\f"])
KEYS = st.sampled_from([b"MODE", b"Q4_0_RADIUS", b"TABLE_MODE", b"TABLE_DIR", b"HIST_OUT", b"TENSOR", b"TENSOR",
                        b"mode", b"Q4_0_radius", b"TABLE", b"", b"MODE MODE", b"\xe9T\xc3\xa9"])
NUMBERS = st.sampled_from([b"0", b"1", b"2", b"3", b"7", b"8", b"-1", b"+3", b"07", b"-0", b"3x", b"x3", b"1 2",
                           b"99999999999999999999", b"-", b"+", b"\xd9\xa3", b"0x3", b"3.0"])
PATTERNS = st.sampled_from([b"blk.*.ffn_down.weight", b"*", b"?", b"*attn_q*", b"blk.1?.*", b"token_embd.weight",
                            b"a=b", b"caf\xe9", b"x" * 255, b"x" * 256, b"**", b"*.weight", b"\x7f", b"a\vb", b"[0-9]"])
SETTINGS_TOKENS = st.one_of(
    st.sampled_from([b"Q4_0_RADIUS=", b"TABLE_MODE=", b"Q4_0_RADIUS", b"RADIUS=1", b"=1", b"q4_0_radius=1",
                     b"TABLE_MODE=off", b"TABLE_MODE=basic", b"TABLE_MODE=balanced", b"TABLE_MODE=gen.table",
                     b"TABLE_MODE=tables/gen.table", b"TABLE_MODE=nosuch", b"TABLE_MODE=bad.name", b"TABLE_MODE=sub",
                     b"TABLE_MODE==", b"Q4_0_RADIUS==1"]),
    NUMBERS.map(lambda n: b"Q4_0_RADIUS=" + n),
    st.integers(250, 260).map(lambda n: b"TABLE_MODE=" + b"t" * n))


@st.composite
def rule_value(draw):
    """A TENSOR value: a pattern and settings, each drawn from valid and invalid forms."""
    n = draw(st.sampled_from([1, 1, 1, 2, 2, 0, 3]))  # mostly a well-formed count, so later checks are reached
    settings = [draw(SETTINGS_TOKENS | st.sampled_from([b"Q4_0_RADIUS=2", b"TABLE_MODE=basic"])) for _ in range(n)]
    tokens = [draw(PATTERNS | st.sampled_from([b"blk.*", b"*ffn_up*"]))] + settings
    return draw(st.sampled_from([b" ", b"\t", b"  "])).join(tokens)


VALUES = st.one_of(
    st.sampled_from([b"simple", b"pablo", b"Pablo", b"off", b"basic", b"balanced", b"nosuch", b".table", b"x.table",
                     b"tables/basic.table", b"gen.table", b"tables/gen.table", b"bad.name", b"sub", b"tables",
                     b"h.json", b"sub/h.json", b"nodir/h.json", b"/", b"caf\xe9", b"a=b", b"sub/", b"../root/h.json"]),
    NUMBERS,
    st.integers(250, 260).map(lambda n: b"t" * n),              # around the TABLE_MODE length limit
    st.integers(4000, 4100).map(lambda n: b"d/" * (n // 2)),    # around the path length limit
    rule_value(),
)
COMMENT = st.sampled_from([b"", b"# a comment", b"#", b"# caf\xe9 \xff", b"#MODE = pablo"])


@st.composite
def kv_line(draw):
    return (draw(SPACE) + draw(KEYS) + draw(SPACE) + draw(st.sampled_from([b"=", b"", b"=="])) + draw(SPACE)
            + draw(VALUES) + draw(SPACE) + draw(COMMENT))


@st.composite
def legacy_line(draw):
    return draw(SPACE) + b" ".join(draw(st.lists(NUMBERS, min_size=1, max_size=4))) + draw(SPACE) + draw(COMMENT)


LINE = st.one_of(kv_line(), kv_line(), legacy_line(), COMMENT, SPACE,
                 st.binary(max_size=20), st.integers(4090, 4100).map(lambda n: b"#" + b"x" * n))


@st.composite
def conf_file(draw):
    lines = draw(st.lists(LINE, max_size=8))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = eol.join(lines) + draw(st.sampled_from([b"", eol]))
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\0" + data[at:]
    return data


def table_text(levels=None, ranges=None) -> list[bytes]:
    lo = [-128, -86, -64, -49, -37, -27, -18, -9, 0, 9, 18, 27, 37, 49, 64, 86] if ranges is None else ranges
    hi = [b - 1 for b in lo[1:]] + [127]
    lev = levels or [-127, -65, -50, -38, -28, -19, -10, -1, 0, 9, 18, 27, 37, 49, 64, 127]
    return [f"{c - 8} {a} {b} {v}".encode() for c, (a, b, v) in enumerate(zip(lo, hi, lev))]


@st.composite
def table_file(draw):
    lines = table_text()
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 5))
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if op == 0 and lines:
            del lines[i]
        elif op == 1:
            lines.insert(i, draw(st.sampled_from([b"", b"# note", b"  ", b"\t# x"])))
        elif op == 2 and lines:
            tok = lines[i].split()
            if tok:
                tok[draw(st.integers(0, len(tok) - 1))] = draw(NUMBERS | st.sampled_from([b"-128", b"127", b"128",
                                                                                        b"-129", b"86", b"64"]))
            lines[i] = draw(st.sampled_from([b" ", b"\t", b"  "])).join(tok)
        elif op == 3 and lines:
            lines.append(lines[i])
        elif op == 4 and lines:
            lines[i] = lines[i] + b" 5"
        else:
            lines[i:i] = [draw(st.binary(max_size=12))]
    return b"\n".join(lines) + b"\n"


TABLE_TEXT = b"\n".join(table_text()) + b"\n"
VALID = [b"MODE = pablo\nQ4_0_RADIUS = 2\n", b"MODE = simple\n", b"1 2 0\n", b"0 0 2\n",
         b"MODE = pablo\nTABLE_MODE = balanced\nHIST_OUT = h.json\n",
         b"MODE = pablo  # c\nTABLE_DIR = tables\nTABLE_MODE = basic\n",
         b"MODE = pablo\nTABLE_MODE = gen.table\n", b"MODE=pablo\nQ4_0_RADIUS=7\nHIST_OUT=sub/h.json\n",
         b"MODE = pablo\nTENSOR = blk.*.ffn_down.weight Q4_0_RADIUS=3\nTENSOR = *q* TABLE_MODE=basic Q4_0_RADIUS=1\n"]
ALPHABET = b"= #\t\r\n\0\xef\xbb\xbf\xe9/.-+0123456789abcdMODEPABLO_"


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op, at = draw(st.integers(0, 2)), draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(list(ALPHABET)) | st.integers(0, 255))
        if op == 0:
            data.insert(at, byte)
        elif op == 1 and at < len(data):
            del data[at]
        elif at < len(data):
            data[at] = byte
    return bytes(data)


@st.composite
def valid_conf(draw):
    """A configuration meant to be accepted, written every way the grammar allows: keys in any order,
    spaces, comments and blank lines anywhere, CRLF, a BOM, every table form, HIST_OUT or not; or the
    legacy one-line form. (The mutations above are mostly rejected: this keeps both verdicts common.)"""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    if draw(st.integers(0, 4)) == 0:
        line = b" ".join([draw(st.sampled_from([b"0", b"1"])), str(draw(st.integers(0, 7))).encode(),
                          draw(st.sampled_from([b"0", b"1", b"2"]))])
        return draw(SPACE) + line + draw(SPACE) + draw(COMMENT) + draw(st.sampled_from([b"", eol]))
    pairs = [(b"MODE", draw(st.sampled_from([b"simple", b"pablo"]))),
             (b"Q4_0_RADIUS", str(draw(st.integers(0, 7))).encode())]
    table = draw(st.sampled_from([None, b"off", b"basic", b"balanced", b"gen.table", b"tables/gen.table", b"gen",
                                  b"./gen.table", b"tables//gen.table"]))
    if table is not None:
        pairs.append((b"TABLE_MODE", table))
        if table in (b"basic", b"balanced", b"gen") and draw(st.booleans()):
            pairs.append((b"TABLE_DIR", b"tables"))
    if draw(st.booleans()):
        pairs.append((b"HIST_OUT", draw(st.sampled_from([b"h.json", b"sub/h.json", b"tables/../h.json", b"./h.json"]))))
    for _ in range(draw(st.integers(0, 3))):  # TENSOR rules, valid ones
        settings = [b"Q4_0_RADIUS=" + str(draw(st.integers(0, 7))).encode(),
                    b"TABLE_MODE=" + draw(st.sampled_from([b"off", b"basic", b"balanced", b"gen.table", b"gen"]))]
        settings = draw(st.permutations(settings))[:draw(st.integers(1, 2))]
        pattern = draw(st.sampled_from([b"blk.*.ffn_down.weight", b"*", b"*attn_q*", b"blk.1?.*", b"output.weight"]))
        pairs.append((b"TENSOR", draw(st.sampled_from([b" ", b"\t"])).join([pattern] + settings)))
    pairs = draw(st.permutations(pairs))
    lines = []
    for key, value in pairs:
        lines += draw(st.lists(st.sampled_from([b"", b"# note", b"  ", b"\t# x"]), max_size=2))
        eq = draw(SPACE) + b"=" + draw(SPACE)
        lines.append(draw(SPACE) + key + eq + value + draw(st.sampled_from([b"", b" ", b"\t"])) + draw(COMMENT))
    data = eol.join(lines) + draw(st.sampled_from([b"", eol]))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


# ---- the tests ----------------------------------------------------------------------------

@SETTINGS
@given(data=st.binary(max_size=300), relative=st.booleans())
def test_random_bytes(harness, data, relative):
    compare(harness, {"pablo.conf": data}, relative=relative)


@SETTINGS
@given(data=conf_file(), table=table_file(), target=st.sampled_from(["pablo.conf"] * 8 + ["sub", "missing.conf"]))
def test_built_from_keys_values_and_tables(harness, data, table, target):
    compare(harness, {"pablo.conf": data, "gen.table": table, "tables/gen.table": table}, target)


@SETTINGS
@given(data=mutated(), table=table_file())
def test_mutations_of_valid_files(harness, data, table):
    compare(harness, {"pablo.conf": data, "gen.table": table}, relative=data.startswith(b"MODE = p"))


@SETTINGS
@given(table=table_file(), how=st.sampled_from([b"gen.table", b"tables/gen.table", b"gen"]),
       bom=st.booleans(), latin1=st.booleans())
def test_table_rules(harness, table, how, bom, latin1):
    conf_text = (b"\xef\xbb\xbf" if bom else b"") + b"MODE = pablo" + (b"  # caf\xe9" if latin1 else b"") + b"\n"
    compare(harness, {"pablo.conf": conf_text + b"TABLE_MODE = " + how + b"\n", "gen.table": table,
                      "tables/gen.table": table})


@SETTINGS
@given(data=valid_conf(), relative=st.booleans())
def test_valid_files_written_every_way(harness, data, relative):
    compare(harness, {"pablo.conf": data, "gen.table": TABLE_TEXT, "tables/gen.table": TABLE_TEXT},
            relative=relative)


@SETTINGS
@given(rules=st.lists(st.one_of(rule_value(), rule_value(), rule_value(), st.sampled_from([b"", b"x"])),
                      min_size=1, max_size=3),
       mode=st.sampled_from([b"pablo", b"simple"]), table_dir=st.booleans())
def test_tensor_rules(harness, rules, mode, table_dir):
    text = b"MODE = " + mode + b"\n" + (b"TABLE_DIR = tables\n" if table_dir else b"")
    text += b"".join(b"TENSOR = " + r + b"\n" for r in rules)
    compare(harness, {"pablo.conf": text, "gen.table": TABLE_TEXT, "tables/gen.table": TABLE_TEXT})


@pytest.mark.parametrize("n", [4096, 4097])
def test_the_most_rules_a_file_can_hold(harness, n):
    text = b"MODE = pablo\n" + b"".join(b"TENSOR = blk.%d.* Q4_0_RADIUS=%d\n" % (i, i % 8) for i in range(n))
    compare(harness, {"pablo.conf": text})


def test_all_files_agreed_on_enough_of_both_verdicts():
    """Runs last: the whole module's counts (each test's sanitizer check ran at its end)."""
    assert not COUNT["disagreements"], COUNT["disagreements"][:5]
    assert COUNT["files"] >= 10_000, f"only {COUNT['files']} files were compared (run the whole module)"
    assert COUNT["accepted"] >= FLOOR and COUNT["rejected"] >= FLOOR, COUNT
