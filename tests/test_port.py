"""Moving the series to a new upstream (`upstream bump` / `continue` / `abort`, and the
3-way `patches check`), on a small local upstream made in the test (fast); and the real
series against another real llama-cpp-python release."""

import re
import os
import subprocess
import sys

import pytest

from conftest import git, orchestrate
from orchestrator import paths
from orchestrator.errors import OrchestrateError
from orchestrator.fork import port, upstream

A = "".join(f"int a{i} = {i};\n" for i in range(20))
B = "".join(f"int b{i} = {i};\n" for i in range(20))


def make_series(tp):
    """Two patches (a3 in a.c, b5 in b.c), made the developer's way."""
    orchestrate("patches", "status", check=True)
    v = tp["vendor"]
    (v / "a.c").write_text(A.replace("int a3 = 3;", "int a3 = 33;"))
    git(v, "commit", "-qam", "Change a3\n\nWhy: a test patch.")
    (v / "b.c").write_text(B.replace("int b5 = 5;", "int b5 = 55;"))
    git(v, "commit", "-qam", "Change b5\n\nWhy: another test patch.")
    orchestrate("patches", "export", check=True)


def new_upstream(tp, a=A, b=B, extra=None) -> str:
    """Commit another upstream version (a.c, b.c, optional extra files) and return its id."""
    up = tp["upstream"]
    (up / "a.c").write_text(a)
    (up / "b.c").write_text(b)
    for name, text in (extra or {}).items():
        (up / name).write_text(text)
    git(up, "add", "-A")
    git(up, "commit", "-qm", "next")
    return git(up, "rev-parse", "HEAD")


def state(tp):
    """Everything a bump may change: HEAD, the upstream tag, files, status, patches/, pin."""
    v, proj = tp["vendor"], tp["proj"]
    files = {p.name: p.read_bytes() for p in v.iterdir() if p.is_file()}
    pdir = {p.name: p.read_bytes() for p in (proj / "patches").iterdir()}
    return (git(v, "rev-parse", "HEAD"), git(v, "rev-parse", "upstream^{commit}"), git(v, "status", "--porcelain"),
            files, pdir, (proj / "conf" / "upstream.yaml").read_text(), (v / ".git" / "orchestrate.json").read_text())


def start(tp, commit, checked=None):
    repo = upstream.open_repo(tp["vendor"])
    pin = upstream.Pin("git", url=str(tp["upstream"]), commit=commit)
    return repo, pin, port.start(repo, paths.patches_dir(), pin, upstream.pin_file())


def finish(repo, checked):
    return port.finish(repo, paths.patches_dir(), upstream.pin_file(), checked.append)


def test_clean_bump(tiny_project):
    make_series(tiny_project)
    c = new_upstream(tiny_project, a=A + "int a_new = 1;\n")
    repo, pin, results = start(tiny_project, c)
    assert [(r.name, r.outcome) for r in results] == [("0001-Change-a3.patch", port.CLEAN),
                                                      ("0002-Change-b5.patch", port.CLEAN)]
    checked = []
    assert finish(repo, checked) == pin and checked == [pin]
    assert upstream.load_pin() == pin  # the new pin, written only after the build-and-canary step
    v = tiny_project["vendor"]
    assert (v / "a.c").read_text() == A.replace("int a3 = 3;", "int a3 = 33;") + "int a_new = 1;\n"
    assert git(v, "rev-parse", "upstream^{commit}") != git(tiny_project["upstream"], "rev-parse", "HEAD")
    assert git(v, "show", "upstream:a.c") == (A + "int a_new = 1;\n").strip()
    st = orchestrate("patches", "status", check=True).stdout
    assert "not applied" not in st and "drifted" not in st
    assert not upstream.bump_in_progress(v)


def test_bump_that_needs_a_3_way_merge(tiny_project):
    make_series(tiny_project)
    # a line two away from the patched one changes: the patch's context no longer matches, git merges
    c = new_upstream(tiny_project, a=A.replace("int a1 = 1;", "int a1 = 100;"))
    repo, pin, results = start(tiny_project, c)
    assert [r.outcome for r in results] == [port.MERGED, port.CLEAN]
    finish(repo, [])
    assert (tiny_project["vendor"] / "a.c").read_text() == A.replace("int a1 = 1;", "int a1 = 100;").replace(
        "int a3 = 3;", "int a3 = 33;")


def test_conflict_then_continue_exports_the_resolution(tiny_project):
    make_series(tiny_project)
    v = tiny_project["vendor"]
    c = new_upstream(tiny_project, b=B.replace("int b5 = 5;", "int b5 = 500;"))
    res = orchestrate("upstream", "bump", "--git-url", tiny_project["upstream"], "--commit", c)
    assert res.returncode == 1
    assert "0001-Change-a3.patch: applied cleanly" in res.stdout
    assert "0002-Change-b5.patch: conflict in b.c" in res.stdout
    assert res.stderr.startswith("error: 0002-Change-b5.patch conflicts with the new upstream (b.c)")
    assert "<<<<<<<" in (v / "b.c").read_text() and upstream.bump_in_progress(v)
    # the pin is untouched while the bump is open; other commands refuse to touch vendor/
    assert upstream.load_pin().commit == tiny_project["v1"]
    res = orchestrate("build")
    assert res.returncode == 1 and "bump is in progress" in res.stderr
    res = orchestrate("upstream", "continue")
    assert res.returncode == 1 and "still in conflict: b.c" in res.stderr
    (v / "b.c").write_text(B.replace("int b5 = 5;", "int b5 = 555;"))  # the resolution
    git(v, "add", "b.c")
    repo = upstream.open_repo(v)
    results = port.resume(repo, paths.patches_dir(), upstream.pin_file())
    assert [r.outcome for r in results] == [port.CLEAN, port.BY_HAND]
    finish(repo, [])
    # the exported patches are exactly what a developer would write by hand on the new upstream
    got = tiny_project["proj"] / "patches"
    date = lambda name: [line[6:] for line in (got / name).read_text().splitlines() if line.startswith("Date: ")][0]  # noqa: E731
    expected = tiny_project["proj"] / "expected"
    up = tiny_project["upstream"]
    git(up, "checkout", "-q", "-b", "expect")
    for name, text, msg in (("0001-Change-a3.patch", A.replace("int a3 = 3;", "int a3 = 33;"), "Change a3\n\nWhy: a test patch."),
                            ("0002-Change-b5.patch", B.replace("int b5 = 5;", "int b5 = 555;"), "Change b5\n\nWhy: another test patch.")):
        (up / ("a.c" if "a3" in name else "b.c")).write_text(text)
        subprocess.run(["git", "commit", "-qam", msg], cwd=up, check=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_AUTHOR_DATE": date(name),
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    git(up, "format-patch", "-q", "-N", "--zero-commit", "--full-index", "--no-signature", "-o", str(expected), f"{c}..HEAD")
    for name in ("0001-Change-a3.patch", "0002-Change-b5.patch"):
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name
    assert upstream.load_pin().commit == c


def test_abort_restores_exactly(tiny_project):
    make_series(tiny_project)
    before = state(tiny_project)
    c = new_upstream(tiny_project, a=A + "int a_new = 1;\n", b=B.replace("int b5 = 5;", "int b5 = 500;"),
                     extra={"c.c": "int c;\n"})
    assert orchestrate("upstream", "bump", "--git-url", tiny_project["upstream"], "--commit", c).returncode == 1
    assert state(tiny_project) != before
    res = orchestrate("upstream", "abort")
    assert res.returncode == 0, res.stderr
    assert state(tiny_project) == before
    assert not (tiny_project["vendor"] / "c.c").exists() and not upstream.bump_in_progress(tiny_project["vendor"])
    assert orchestrate("upstream", "abort").returncode == 1  # nothing left to abort
    # an upstream that cannot be fetched leaves nothing open
    res = orchestrate("upstream", "bump", "--git-url", tiny_project["upstream"], "--commit", "0" * 40)
    assert res.returncode == 1 and "cannot fetch" in res.stderr and len(res.stderr.splitlines()) == 1
    assert state(tiny_project) == before and not upstream.bump_in_progress(tiny_project["vendor"])
    res = orchestrate("upstream", "bump", "--git-url", tiny_project["upstream"], "--commit", "abc")
    assert res.returncode == 1 and "full 40-hex commit id" in res.stderr


KILL_AFTER_FIRST_PATCH = """
import os, signal, sys
from orchestrator import paths
from orchestrator.fork import port, upstream
real, n = port.apply_one, []
def apply_then_die(repo, patch):
    if n:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the replay
    n.append(1)
    return real(repo, patch)
port.apply_one = apply_then_die
repo = upstream.open_repo(paths.vendor_dir())
port.start(repo, paths.patches_dir(), upstream.Pin("git", url=sys.argv[1], commit=sys.argv[2]), upstream.pin_file())
"""


@pytest.mark.parametrize("then", ["continue", "abort"])
def test_killed_bump_can_be_continued_or_aborted(tiny_project, then):
    make_series(tiny_project)
    before = state(tiny_project)
    c = new_upstream(tiny_project, a=A + "int a_new = 1;\n")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_PATCH, str(tiny_project["upstream"]), c],
                          env={**os.environ}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    v = tiny_project["vendor"]
    assert upstream.bump_in_progress(v) and len(upstream.commits_since_upstream(upstream.open_repo(v))) == 1
    if then == "abort":
        assert orchestrate("upstream", "abort").returncode == 0
        assert state(tiny_project) == before
        return
    repo = upstream.open_repo(v)
    results = port.resume(repo, paths.patches_dir(), upstream.pin_file())
    assert [r.outcome for r in results] == [port.CLEAN, port.CLEAN]
    finish(repo, [])
    assert upstream.load_pin().commit == c and (v / "b.c").read_text() == B.replace("int b5 = 5;", "int b5 = 55;")


def test_check_reports_every_patch_and_dependencies(tiny_project):
    make_series(tiny_project)
    v = tiny_project["vendor"]
    (v / "b.c").write_text((v / "b.c").read_text().replace("int b9 = 9;", "int b9 = 99;"))
    git(v, "commit", "-qam", "Change b9\n\nWhy: a third patch, on the file of the second.")
    orchestrate("patches", "export", check=True)
    before = state(tiny_project)
    c = new_upstream(tiny_project, b=B.replace("int b5 = 5;", "int b5 = 500;"))
    res = orchestrate("patches", "check", "--git-url", tiny_project["upstream"], "--commit", c)
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "0001-Change-a3.patch: applied cleanly"
    assert lines[1].startswith("0002-Change-b5.patch: conflict in b.c")
    assert lines[2] == "0003-Change-b9.patch: applied cleanly; depends on 0002-Change-b5.patch (both change b.c)"
    assert state(tiny_project) == before  # vendor/ untouched


def test_patches_list_shows_the_footprint_in_upstream_files(fork):
    out = orchestrate("patches", "list", check=True).stdout
    rows = [line for line in out.splitlines() if line.strip()]
    assert rows and all("[upstream files: " in r for r in rows)
    upstream_lines = sum(int(r.split("upstream files: ")[1].split()[0]) for r in rows)
    own_lines = sum(int(r.split("own files: ")[1].split()[0]) for r in rows)
    assert own_lines > 10 * upstream_lines  # our code lives in our own files


def test_each_patch_adds_its_capability_without_rewriting_earlier_ones():
    """One patch per capability: a later patch may extend a file an earlier one created, but removes
    at most a handful of the lines that earlier patches added (read from the patch files as text)."""
    from collections import Counter

    from orchestrator import paths
    pdir = paths.project() / "patches"
    names = [n for n in (pdir / "series").read_text().split() if n]
    added: dict[str, Counter] = {}
    for name in names:
        text = (pdir / name).read_text(encoding="utf-8")
        removed_earlier = 0
        new_lines: dict[str, list[str]] = {}
        for part in re.split(r"^diff --git a/\S+ b/", text, flags=re.M)[1:]:
            path, body = part.split("\n", 1)
            for line in body.split("\n"):
                if line.startswith("-") and not line.startswith("--- "):
                    if added.get(path, Counter())[line[1:]] > 0:
                        added[path][line[1:]] -= 1
                        removed_earlier += 1
                elif line.startswith("+") and not line.startswith("+++ "):
                    new_lines.setdefault(path, []).append(line[1:])
        for path, lines in new_lines.items():
            added.setdefault(path, Counter()).update(lines)
        assert removed_earlier <= 8, f"{name} rewrites {removed_earlier} lines of earlier patches"  # a handful
    assert len(names) >= 6  # conf reader; radius and tables; histograms; per-token scores; error sums; rules


def test_real_series_against_another_release(fork):
    """The real patches, 3-way, onto the llama.cpp of llama-cpp-python 0.3.33 (a real download)."""
    res = orchestrate("patches", "check", "--sdist-version", "0.3.33")
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    series = (paths.patches_dir() / "series").read_text().split()
    assert [line.split(":")[0] for line in lines[:len(series)]] == series
    assert all(port.CONFLICT not in line for line in lines), res.stdout
    assert res.returncode == 0 and "apply to llama-cpp-python==0.3.33" in res.stdout


def test_3_way_merge_of_a_patch_on_a_file_an_earlier_patch_changed(tiny_project):
    """The second patch's base is a.c as the first patch left it: those blobs must exist even when
    vendor/ had the series unapplied."""
    orchestrate("patches", "status", check=True)
    v = tiny_project["vendor"]
    (v / "a.c").write_text(A.replace("int a3 = 3;", "int a3 = 33;"))
    git(v, "commit", "-qam", "Change a3\n\nWhy: a test patch.")
    (v / "a.c").write_text(A.replace("int a3 = 3;", "int a3 = 33;").replace("int a9 = 9;", "int a9 = 99;"))
    git(v, "commit", "-qam", "Change a9\n\nWhy: a second patch on the same file.")
    orchestrate("patches", "export", check=True)
    orchestrate("patches", "unapply", check=True)
    before = state(tiny_project)
    c = new_upstream(tiny_project, a=A.replace("int a7 = 7;", "int a7 = 70;"))  # inside patch 2's context
    res = orchestrate("patches", "check", "--git-url", tiny_project["upstream"], "--commit", c)
    assert res.returncode == 0 and "0002-Change-a9.patch: merged (3-way)" in res.stdout, res.stdout + res.stderr
    repo, pin, results = start(tiny_project, c)
    assert [r.outcome for r in results] == [port.CLEAN, port.MERGED]
    assert orchestrate("upstream", "abort").returncode == 0
    assert state(tiny_project) == before  # unapplied, exactly as it was


def test_selftest_passes_on_the_fork(fork):
    res = orchestrate("selftest")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ok: ") == 4


def test_selftest_names_the_check_a_dead_hook_fails(fork, demo_base, tmp_path):
    """A fork whose llama-quantize never sees its configuration (as if an upstream refactor had
    moved the hook away): the canary fails, and names the check."""
    from orchestrator.fork.build import Fork
    from orchestrator.study import selftest
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "llama-quantize"
    wrapper.write_text(f"#!/bin/sh\nunset PABLO_CONF\ncd /\nexec {fork.binary('llama-quantize')} \"$@\"\n")
    wrapper.chmod(0o755)
    dead = Fork(tmp_path, fork.stamp)
    with pytest.raises(selftest.CanaryFailed, match=r"selftest failed: hooks off and MODE=simple .*no histograms"):
        selftest.run(dead, demo_base)


def test_a_failing_canary_leaves_the_bump_open_and_the_pin_as_it_was(tiny_project):
    make_series(tiny_project)
    c = new_upstream(tiny_project, a=A + "int a_new = 1;\n")
    repo, pin, _ = start(tiny_project, c)

    def canary_fails(p):
        raise OrchestrateError("selftest failed: radius zeroes small values")
    with pytest.raises(OrchestrateError, match="selftest failed"):
        port.finish(repo, paths.patches_dir(), upstream.pin_file(), canary_fails)
    assert upstream.load_pin().commit == tiny_project["v1"] and upstream.bump_in_progress(tiny_project["vendor"])
    checked = []  # fixed (here: a canary that passes), the same bump finishes
    assert finish(repo, checked) == pin and checked == [pin] and upstream.load_pin() == pin
    assert not upstream.bump_in_progress(tiny_project["vendor"])


def test_the_cli_bump_runs_its_build_and_canary(tiny_project):
    """`orchestrate upstream bump` goes on from the replay to the build (here a tree that cannot build:
    the tiny upstream has no CMakeLists.txt), and its failure leaves the bump open, the pin unchanged."""
    make_series(tiny_project)
    before = state(tiny_project)
    c = new_upstream(tiny_project, a=A + "int a_new = 1;\n")
    res = orchestrate("upstream", "bump", "--git-url", tiny_project["upstream"], "--commit", c)
    assert res.returncode == 1 and "0001-Change-a3.patch: applied cleanly" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: build of the fork failed"), res.stderr
    assert upstream.load_pin().commit == tiny_project["v1"] and upstream.bump_in_progress(tiny_project["vendor"])
    assert orchestrate("upstream", "abort").returncode == 0 and state(tiny_project) == before
