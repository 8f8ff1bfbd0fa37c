"""Bad input, command by command: one line on stderr that names the problem, a non-zero exit,
no traceback, and nothing half-written left behind.

One table: each row is a command line run from a scratch directory holding the bad files
(relative paths, as a user types them), and the words its one error line must contain.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_root, orchestrate

HERE = Path(__file__).resolve().parent

# the bad things a user hands over, laid down in the scratch directory
FILES = {
    "truncated.gguf": lambda demo: demo.read_bytes()[:4096],
    "notgguf.gguf": lambda demo: b"this is a text file, not a model\n" * 10,
    "text.txt": lambda demo: b"Some text to score.\n" * 100,
    "unknown-key.yaml": lambda demo: b"name: x\ntypes: [Q4_0]\ncolour: red\n",
    "a-file": lambda demo: b"not a directory\n",
    "results-bad/results.json": lambda demo: b"{ truncated",
    "results-other/results.json": lambda demo: b'{"schema": "something/else"}',
    "bad.conf": lambda demo: b"MODE = pablo\nQ4_0_RADIUS = 1\x00junk\n",
    "dup.yaml": lambda demo: b"name: x\nname: y\n",
    "alias.yaml": lambda demo: b"types: &t [Q4_0]\ntables: *t\n",
    "bomb.yaml": lambda demo: b"description: &a [x, x, x, x, x, x, x, x, x]\nname: [*a, *a, *a, *a, *a, *a, *a]\n",
    "escape.yaml": lambda demo: b"name: ../../escaped\ntypes: [Q4_0]\n",
    "hidden-name.yaml": lambda demo: b"name: .hidden\n",
    "free-text.yaml": lambda demo: b"description: {a: 1}\n",
    "huge.yaml": lambda demo: b"# " + b"x" * (1 << 20) + b"\n",
    "huge.table": lambda demo: b"# " + b"x" * (1 << 16) + b"\n",
    "t\udcff.table": lambda demo: (HERE.parent / "conf" / "tables" / "basic.table").read_bytes(),  # name: not UTF-8
}
# special files and links, made by the fixture: (name, kind)
SPECIAL = [("fifo.gguf", "fifo"), ("fifo.txt", "fifo"), ("fifo.conf", "fifo"), ("fifo.table", "fifo"),
           ("loop.gguf", "loop"), ("dangling.gguf", "dangling"), ("link-to-base.gguf", "symlink"),
           ("base-hard.gguf", "hardlink")]
DIRS = ["adir", "adir.gguf"]

# (id, command line, words the one error line contains)
MATRIX = [
    # quantize
    ("quantize-missing", ["quantize", "nosuch.gguf", "o.gguf", "Q4_0"], ["nosuch.gguf", "does not exist"]),
    ("quantize-relative-missing", ["quantize", "../nosuch/m.gguf", "o.gguf", "Q4_0"], ["m.gguf", "does not exist"]),
    ("quantize-directory", ["quantize", "adir.gguf", "o.gguf", "Q4_0"], ["adir.gguf", "directory"]),
    ("quantize-truncated", ["quantize", "truncated.gguf", "o.gguf", "Q4_0"], ["truncated.gguf", "not a readable GGUF"]),
    ("quantize-not-gguf", ["quantize", "notgguf.gguf", "o.gguf", "Q4_0"], ["notgguf.gguf", "not a readable GGUF"]),
    ("quantize-unwritable-out", ["quantize", "{demo}", "a-file/o.gguf", "Q4_0"], ["a-file/o.gguf", "directory"]),
    ("quantize-out-is-dir", ["quantize", "{demo}", "adir", "Q4_0"], ["adir", "is a directory"]),
    ("quantize-bad-type", ["quantize", "{demo}", "o.gguf", "Q4_7"], ["unknown quantization type 'Q4_7'", "Q4_K_M"]),
    ("quantize-imatrix-type", ["quantize", "{demo}", "o.gguf", "IQ2_XXS"], ["IQ2_XXS", "importance matrix"]),
    ("quantize-bad-table", ["quantize", "{demo}", "o.gguf", "Q8_0", "--table", "nosuch"], ["unknown table 'nosuch'"]),
    ("quantize-bad-env", ["quantize", "{demo}", "o.gguf", "Q4_0", "--llama-env", "NOEQUALS"], ["--llama-env", "KEY=VALUE"]),
    # sweep
    ("sweep-missing-model", ["sweep", "--model", "nosuch.gguf", "--out", "out"], ["nosuch.gguf", "does not exist"]),
    ("sweep-directory-model", ["sweep", "--model", "adir", "--out", "out"], ["adir", "directory"]),
    ("sweep-truncated", ["sweep", "--model", "truncated.gguf", "--out", "out"], ["truncated.gguf", "not a readable GGUF"]),
    ("sweep-not-gguf", ["sweep", "--model", "notgguf.gguf", "--out", "out"], ["notgguf.gguf", "not a readable GGUF"]),
    ("sweep-missing-text", ["sweep", "--text", "nosuch.txt", "--out", "out"], ["nosuch.txt", "does not exist"]),
    ("sweep-directory-text", ["sweep", "--text", "adir", "--out", "out"], ["adir", "directory"]),
    ("sweep-unwritable-out", ["sweep", "--text", "text.txt", "--out", "a-file/out"], ["a-file/out", "cannot create"]),
    ("sweep-out-is-file", ["sweep", "--text", "text.txt", "--out", "a-file"], ["a-file", "is a file"]),
    ("sweep-bad-type", ["sweep", "--types", "Q4_0,NOPE", "--radius", "none", "--tables", "none", "--out", "out"],
     ["unknown quantization type 'NOPE'"]),
    ("sweep-imatrix-type", ["sweep", "--types", "Q2_K_S", "--radius", "none", "--tables", "none", "--out", "out"],
     ["Q2_K_S", "importance matrix"]),
    ("sweep-twin-types", ["sweep", "--types", "Q4_0,q4_0", "--radius", "none", "--tables", "none", "--out", "out"],
     ["two variants would be named q4_0"]),
    ("sweep-unknown-key", ["sweep", "--config", "unknown-key.yaml", "--out", "out"], ["unknown-key.yaml", "colour"]),
    ("sweep-missing-config", ["sweep", "--config", "nosuch.yaml", "--out", "out"], ["nosuch.yaml", "does not exist"]),
    ("sweep-directory-config", ["sweep", "--config", "adir", "--out", "out"], ["adir", "directory"]),
    ("sweep-bad-radius", ["sweep", "--radius", "0..9", "--out", "out"], ["radius", "0..7"]),
    ("sweep-bad-ctx", ["sweep", "--ctx", "4", "--out", "out"], ["--ctx"]),
    # a text too short for what is asked: refused before any work, with the counts
    ("sweep-short-text", ["sweep", "--text", "text.txt", "--out", "out"], ["text.txt", "tokens for this model", "need"]),
    ("sweep-too-many-chunks", ["sweep", "--chunks", "999", "--out", "out"], ["999 chunks of -c 512 need 511488"]),
    ("sweep-ctx-over-text", ["sweep", "--text", "text.txt", "--ctx", "4096", "--chunks", "0", "--out", "out"],
     ["text.txt", "needs two windows", "8192"]),
    # experiment files: bounded, one meaning per key
    ("sweep-duplicate-key", ["sweep", "--config", "dup.yaml", "--out", "out"], ["dup.yaml", "line 2", "duplicate key 'name'"]),
    ("sweep-yaml-alias", ["sweep", "--config", "alias.yaml", "--out", "out"], ["alias.yaml", "anchors and aliases"]),
    ("sweep-yaml-bomb", ["sweep", "--config", "bomb.yaml", "--out", "out"], ["bomb.yaml", "anchors and aliases"]),
    ("sweep-name-escapes", ["sweep", "--config", "escape.yaml", "--out", "out"], ["'../../escaped'", "cannot name a file"]),
    ("sweep-name-hidden", ["sweep", "--config", "hidden-name.yaml", "--out", "out"], ["'.hidden'", "cannot name a file"]),
    ("sweep-free-text", ["sweep", "--config", "free-text.yaml", "--out", "out"], ["description must be a string"]),
    ("sweep-huge-config", ["sweep", "--config", "huge.yaml", "--out", "out"], ["huge.yaml", "at most 1048576"]),
    ("sweep-table-name-not-utf8", ["sweep", "--tables", "t\udcff.table", "--out", "out"],
     ["table file", "is not valid UTF-8"]),
    ("sweep-huge-table", ["sweep", "--tables", "huge.table", "--out", "out"], ["huge.table", "at most 65536"]),
    # special files and links where a regular file is expected
    ("sweep-fifo-model", ["sweep", "--model", "fifo.gguf", "--out", "out"], ["fifo.gguf", "FIFO"]),
    ("sweep-fifo-text", ["sweep", "--text", "fifo.txt", "--out", "out"], ["fifo.txt", "FIFO"]),
    ("sweep-fifo-config", ["sweep", "--config", "fifo.txt", "--out", "out"], ["fifo.txt", "FIFO"]),
    ("sweep-fifo-table", ["sweep", "--tables", "fifo.table", "--out", "out"], ["fifo.table", "FIFO"]),
    ("sweep-loop-model", ["sweep", "--model", "loop.gguf", "--out", "out"], ["loop.gguf", "symbolic links"]),
    ("sweep-dangling-model", ["sweep", "--model", "dangling.gguf", "--out", "out"], ["dangling.gguf", "symlink to nothing"]),
    ("sweep-long-name", ["sweep", "--model", "m" * 300 + ".gguf", "--out", "out"], ["File name too long"]),
    ("quantize-fifo", ["quantize", "fifo.gguf", "o.gguf", "Q4_0"], ["fifo.gguf", "FIFO"]),
    ("quantize-loop", ["quantize", "loop.gguf", "o.gguf", "Q4_0"], ["loop.gguf", "symbolic links"]),
    ("conf-fifo", ["conf", "check", "fifo.conf"], ["fifo.conf", "FIFO"]),
    ("quantize-fifo-table", ["quantize", "{demo}", "o.gguf", "Q8_0", "--table", "fifo.table"], ["fifo.table", "FIFO"]),
    # an output that is an input: refused before anything runs, whatever the link
    ("quantize-out-is-model", ["quantize", "base-hard.gguf", "base-hard.gguf", "Q4_0"], ["output", "is the model"]),
    ("quantize-out-is-symlink-to-model", ["quantize", "{demo}", "link-to-base.gguf", "Q4_0"], ["output", "is the model"]),
    ("quantize-out-is-hardlink-to-model", ["quantize", "base-copy.gguf", "base-hard.gguf", "Q4_0"], ["output", "is the model"]),
    ("quantize-out-relative-same", ["quantize", "base-hard.gguf", "./adir/../base-hard.gguf", "Q4_0"], ["is the model"]),
    ("quantize-hist-is-model", ["quantize", "base-hard.gguf", "o.gguf", "Q4_0", "--hist", "base-hard.gguf"],
     ["histogram file", "is the model"]),
    ("quantize-hist-is-out", ["quantize", "{demo}", "o.gguf", "Q4_0", "--hist", "o.gguf"], ["one file"]),
    # tables fit
    ("tables-missing", ["tables", "fit", "nosuch.gguf"], ["nosuch.gguf", "does not exist"]),
    ("tables-directory", ["tables", "fit", "adir"], ["adir", "directory"]),
    ("tables-truncated", ["tables", "fit", "truncated.gguf"], ["truncated.gguf", "not a readable GGUF"]),
    ("tables-not-gguf", ["tables", "fit", "notgguf.gguf"], ["notgguf.gguf", "not a readable GGUF"]),
    ("tables-unwritable-out", ["tables", "fit", "{demo}", "--out", "a-file/t"], ["a-file/t", "directory"]),
    # plot
    ("plot-missing", ["plot", "nosuch"], ["nosuch", "does not exist"]),
    ("plot-file", ["plot", "a-file"], ["a-file", "is a file"]),
    ("plot-truncated-results", ["plot", "results-bad"], ["results.json"]),
    ("plot-other-schema", ["plot", "results-other"], ["not a sweep results file"]),
    # conf check
    ("conf-missing", ["conf", "check", "nosuch.conf"], ["nosuch.conf", "cannot open: No such file"]),
    ("conf-directory", ["conf", "check", "adir"], ["adir", "cannot open: Is a directory"]),
    ("conf-nul", ["conf", "check", "bad.conf"], ["bad.conf:2", "NUL byte"]),
    ("conf-not-a-conf", ["conf", "check", "notgguf.gguf"], ["notgguf.gguf:1", "expected `KEY = value`"]),
    # usage errors are one line too
    ("usage-unknown-command", ["frobnicate"], ["No such command"]),
    ("usage-missing-argument", ["quantize", "x.gguf"], ["Missing argument"]),
    ("build-bad-jobs", ["build", "-j", "0"], ["--jobs"]),
    ("patches-check-both", ["patches", "check", "--sdist-version", "1", "--git-url", "x"], ["either"]),
    ("patches-check-git-no-commit", ["patches", "check", "--git-url", "x"], ["--commit"]),
]


@pytest.fixture(scope="module")
def scratch(fork, demo_base, tmp_path_factory):
    from orchestrator import demo
    d = tmp_path_factory.mktemp("bad")
    for rel, make in FILES.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(make(demo.demo_model()))
    for name in DIRS:
        (d / name).mkdir()
    for name, kind in SPECIAL:
        path = d / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "loop":
            path.symlink_to(name)
        elif kind == "dangling":
            path.symlink_to("nowhere.gguf")
        elif kind == "symlink":
            path.symlink_to(demo_base)
        else:  # a hard link needs the same file system; a copy's hard link shows the same
            shutil.copyfile(demo_base, d / "base-copy.gguf")
            os.link(d / "base-copy.gguf", path)
    return d


def tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.mark.parametrize("args,words", [pytest.param(a, w, id=i) for i, a, w in MATRIX])
def test_bad_input_is_one_line_and_leaves_nothing(scratch, demo_base, args, words):
    before = tree(scratch)
    res = orchestrate(*[a.replace("{demo}", str(demo_base)) for a in args], cwd=scratch)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr + res.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    left = tree(scratch) - before
    # a failed quantize keeps its log (named in the message); nothing else may appear
    assert {p for p in left if not p.endswith(".log")} == set(), left


@pytest.fixture
def broken_project(tmp_path, monkeypatch):
    """A copy of the project's conf/ and patches/ to break on purpose (vendor/ is not needed)."""
    proj = tmp_path / "proj"
    for sub in ("conf", "patches"):
        shutil.copytree(HERE.parent / sub, proj / sub)
    monkeypatch.setenv("ORCHESTRATE_HOME", str(proj))
    return proj


BAD_PIN, BAD_YAML = ("conf/upstream.yaml", "source: ftp\n"), ("conf/upstream.yaml", "source: [unclosed\n")
PIN_WORDS, YAML_WORDS = ["upstream.yaml", "source must be"], ["upstream.yaml", "cannot read"]
BROKEN = [  # (command, file, its broken text, words)
    (["build"], *BAD_PIN, PIN_WORDS),
    (["build"], *BAD_YAML, YAML_WORDS),
    (["patches", "list"], "patches/series", "0009-no-such.patch\n", ["series:1", "does not exist"]),
    (["patches", "status"], *BAD_PIN, PIN_WORDS),
    (["patches", "apply"], *BAD_YAML, YAML_WORDS),
    (["patches", "unapply"], *BAD_PIN, PIN_WORDS),
    (["patches", "export"], *BAD_PIN, PIN_WORDS),
    (["patches", "check"], *BAD_YAML, YAML_WORDS),
]


@pytest.mark.parametrize("command,rel,text,words", BROKEN, ids=[f"{' '.join(c)}:{r}" for c, r, _, _ in BROKEN])
def test_broken_project_files(broken_project, tmp_path, command, rel, text, words):
    (broken_project / rel).write_text(text)
    res = orchestrate(*command, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not (broken_project / "vendor").exists()


def test_a_killed_quantize_leaves_nothing_the_next_run_keeps(fork, demo_base, tmp_path):
    """A work directory left by a run killed with -9 (it holds a lock no more) is removed by the next
    run for the same output; one a live run holds is not touched, and that second writer is refused."""
    import fcntl
    stale = tmp_path / ".quantize-o.gguf-killed"
    stale.mkdir()
    (stale / "o.gguf").write_bytes(b"half a model")
    res = orchestrate("quantize", demo_base, "o.gguf", "Q4_0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and not list(tmp_path.glob(".quantize-*"))
    live = tmp_path / ".quantize-o.gguf-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        res = orchestrate("quantize", demo_base, "o.gguf", "Q4_0", cwd=tmp_path)
        assert res.returncode == 1 and "another quantization is writing" in res.stderr and live.exists()
    finally:
        os.close(fd)


def test_one_chunk_gives_no_interval_and_no_nan(fork, demo_base, tmp_path):
    out = tmp_path / "out"
    res = orchestrate("sweep", "--radius", "1", "--types", "Q4_0", "--tables", "none", "--chunks", "2", "--ctx", "128",
                      "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "too few for paired intervals" in res.stdout  # said before the work
    cmp = orchestrate("compare", out, "q4_0-r1", "q4_0")
    assert cmp.returncode == 0, cmp.stderr
    assert "nan" not in cmp.stdout.lower() and "no verdict: 2 chunks scored" in cmp.stdout, cmp.stdout
    assert "worse than" not in cmp.stdout and "better than" not in cmp.stdout
    import json
    doc = json.loads((out / "results.json").read_text())
    assert doc["paired"]["groups"] is None and "2 chunks scored" in doc["paired"]["unavailable"]
    report = (out / "report.md").read_text()
    assert "nan" not in report.lower() and "No intervals, verdicts or groups" in report


@pytest.fixture
def read_only(tmp_path):
    """A read-only file system (root can write anywhere else, so permissions alone would not do)."""
    need_root("mounting a read-only tmpfs")
    d = tmp_path / "ro"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(d)], check=True)
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_read_only_outputs_are_one_line(fork, demo_base, read_only, tmp_path):
    for args, words in ((["quantize", demo_base, read_only / "o.gguf", "Q4_0"], "not writable"),
                        (["sweep", "--radius", "1", "--out", read_only / "out"], "cannot create output directory"),
                        (["tables", "fit", demo_base, "--out", read_only / "t"], "not writable")):
        res = orchestrate(*args, cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and words in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr


def test_the_error_handler_cannot_fail(read_only, tmp_path):
    """An unexpected error whose cache (the usual place for its trace) is read-only, and an error message
    that no encoding can print as it is: still one line each, and exit 1."""
    import json
    env = {"ORCHESTRATE_CACHE": str(read_only / "cache"), "TMPDIR": str(read_only), "HOME": str(read_only)}
    # a bug, planted: every input is checked, so no input of ours is known to reach one
    bug = ("import sys; from orchestrator import results; from orchestrator.cli import main\n"
           "def load(directory): raise TypeError('a planted bug')\n"
           "results.load = load; main(sys.argv[1:])")
    res = subprocess.run([sys.executable, "-c", bug, "plot", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, **env})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: internal error: TypeError")
    log = Path(lines[0].rsplit("full trace: ", 1)[1])  # the trace went elsewhere (the system's temporary directory)
    assert not log.is_relative_to(read_only) and "Traceback" in log.read_text()
    log.unlink()
    # a variant named by a lone surrogate (valid JSON, not encodable as UTF-8)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "results.json").write_text(json.dumps({"schema": "orchestrate.sweep/1", "perplexity": {}, "fork": {},
                                                  "description": "", "variants": [
        {"name": "\ud800", "kind": "stock", "status": "ok"}, {"name": "b", "kind": "stock", "status": "ok"}]}))
    res = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(odd), "\udcff", "b"],
                         capture_output=True, env={**os.environ, **env})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith(b"error: "), res.stderr


def test_home_unset_still_works_or_says_why(fork, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "ORCHESTRATE_CACHE", "XDG_CACHE_HOME")}
    for args in (["info"], ["conf", "check", str(tmp_path / "nosuch.conf")]):
        res = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, env=env)
        assert "Traceback" not in res.stderr, res.stderr
        assert res.returncode == 0 or len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("name", [b"m\xff\xfe.gguf", b"m\nnewline.gguf", b"-dash.gguf", b"m with spaces.gguf",
                                  b"\xc3\xb1and\xc3\xba.gguf"], ids=["not-utf8", "newline", "leading-dash", "spaces", "n-tilde"])
def test_any_path_works_or_is_one_line(fork, demo_base, tmp_path, name):
    """Paths a shell can make: quantize from and to them, and sweep's plan on them, either work or say
    why in one line (a pablo.conf cannot hold a newline: that is refused by name)."""
    d = os.fsencode(tmp_path)
    model = os.path.join(d, name)
    os.link(demo_base, model) if os.stat(demo_base).st_dev == os.stat(d).st_dev else shutil.copyfile(demo_base, model)
    out = os.path.join(d, b"out-" + name)
    res = subprocess.run([sys.executable, "-m", "orchestrator", "quantize", "--radius", "1", "--hist",
                          os.path.join(d, b"h-" + name + b".json"), "--", model, out, "Q4_0"],
                         capture_output=True, cwd=tmp_path)
    assert b"Traceback" not in res.stderr, res.stderr
    if res.returncode == 0:
        assert os.path.getsize(out) > 50 << 20
        sweep = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "--model", model, "--radius", "1",
                                "--types", "none", "--tables", "none", "--chunks", "2", "--ctx", "128",
                                "--llama-env", f"ORCHESTRATE_TEST_RUN={os.urandom(4).hex()}",  # really runs
                                "--out", os.path.join(d, b"sweep-" + name)], capture_output=True, cwd=tmp_path)
        assert sweep.returncode == 0 and b"Traceback" not in sweep.stderr, sweep.stderr[-2000:]
        assert os.path.exists(os.path.join(d, b"sweep-" + name, b"report.md"))
    else:
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith(b"error: "), res.stderr
        assert b"\n" in name and b"newline" in lines[0] and not os.path.exists(out)
