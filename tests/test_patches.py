"""The patch series manager on a small local upstream made in the test (fast)."""

import hashlib
import io
import tarfile

import pytest

from conftest import git, orchestrate
from orchestrator.fork import upstream
from orchestrator.errors import OrchestrateError


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def make_series(tp):
    """Two patches (one on a.c, one on b.c) made the developer's way: commit, export."""
    orchestrate("patches", "status", check=True)  # lays down vendor/llama.cpp
    v = tp["vendor"]
    edit(v / "a.c", "int a3 = 3;", "int a3 = 33;")
    git(v, "commit", "-qam", "Change a3\n\nWhy: a test patch.")
    edit(v / "b.c", "int b5 = 5;", "int b5 = 55;")
    git(v, "commit", "-qam", "Change b5\n\nWhy: another test patch.")
    res = orchestrate("patches", "export", check=True)
    assert "exported 2" in res.stdout
    return sorted(p.name for p in (tp["proj"] / "patches").glob("*.patch"))


def snapshot(v):
    """Everything a user could see of the vendor tree: HEAD, status, file bytes, state."""
    files = {p.name: p.read_bytes() for p in v.iterdir() if p.is_file()}
    return git(v, "rev-parse", "HEAD"), git(v, "status", "--porcelain"), files, (v / ".git" / "orchestrate.json").read_text()


def test_vendor_is_a_repo_whose_first_commit_is_pristine_upstream(tiny_project):
    make_series(tiny_project)
    v = tiny_project["vendor"]
    log = git(v, "log", "--format=%s").splitlines()
    assert log == ["Change b5", "Change a3", f"upstream llama.cpp: git {tiny_project['upstream']}@{tiny_project['v1']}"]
    assert "int a3 = 3;" in git(v, "show", "upstream:a.c")


def test_export_round_trips(tiny_project):
    names = make_series(tiny_project)
    pdir = tiny_project["proj"] / "patches"
    before = {n: (pdir / n).read_bytes() for n in names}
    assert (pdir / "series").read_text().split() == names
    orchestrate("patches", "unapply", check=True)
    assert "int a3 = 3;" in (tiny_project["vendor"] / "a.c").read_text()
    st = orchestrate("patches", "status", check=True).stdout
    assert st.count("not applied") == 2
    orchestrate("patches", "apply", check=True)
    assert "int b5 = 55;" in (tiny_project["vendor"] / "b.c").read_text()
    orchestrate("patches", "export", check=True)
    after = {p.name: p.read_bytes() for p in pdir.glob("*.patch")}
    assert after == before


def test_conflicting_patch_leaves_tree_untouched(tiny_project):
    names = make_series(tiny_project)
    pdir, v = tiny_project["proj"] / "patches", tiny_project["vendor"]
    orchestrate("patches", "unapply", check=True)
    # make the second patch expect a line that is not there
    edit(pdir / names[1], "-int b5 = 5;", "-int b5 = 7;")
    before = snapshot(v)
    res = orchestrate("patches", "apply")
    assert res.returncode == 1
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1
    assert names[1] in err and "b.c" in err and "hunk at line" in err
    assert snapshot(v) == before  # not even the first patch stays applied
    # and from a fully applied tree, a changed patch that fails leaves the old one in place
    edit(pdir / names[1], "-int b5 = 7;", "-int b5 = 5;")
    orchestrate("patches", "apply", check=True)
    edit(pdir / names[1], "-int b5 = 5;", "-int b5 = 8;")
    before = snapshot(v)
    assert orchestrate("patches", "apply").returncode == 1
    assert snapshot(v) == before


def test_uncommitted_edits_are_detected_and_kept(tiny_project):
    make_series(tiny_project)
    v = tiny_project["vendor"]
    edit(v / "a.c", "int a9 = 9;", "int a9 = 99;")
    (v / "new.c").write_text("int x;\n")
    st = orchestrate("patches", "status", check=True).stdout
    assert "drifted: uncommitted" in st and "a.c" in st and "new.c" in st
    for cmd in (["apply"], ["unapply"], ["export"]):
        res = orchestrate("patches", *cmd)
        assert res.returncode == 1, cmd
        assert "a.c" in res.stderr
    assert "int a9 = 99;" in (v / "a.c").read_text() and (v / "new.c").exists()
    orchestrate("patches", "unapply", "--discard", check=True)
    assert "int a9 = 9;" in (v / "a.c").read_text() and not (v / "new.c").exists()
    assert "int a3 = 3;" in (v / "a.c").read_text()


def test_commit_no_patch_holds_is_drift_until_exported(tiny_project):
    make_series(tiny_project)
    v = tiny_project["vendor"]
    edit(v / "a.c", "int a12 = 12;", "int a12 = 0;")
    git(v, "commit", "-qam", "Third change")
    st = orchestrate("patches", "status", check=True).stdout
    assert "drifted: commit" in st and "Third change" in st
    assert orchestrate("patches", "apply").returncode == 1
    orchestrate("patches", "export", check=True)
    st = orchestrate("patches", "status", check=True).stdout
    assert st.count("applied") == 3 and "drifted" not in st


def test_edited_patch_file_is_noticed_and_reapplied(tiny_project):
    names = make_series(tiny_project)
    pdir, v = tiny_project["proj"] / "patches", tiny_project["vendor"]
    edit(pdir / names[1], "+int b5 = 55;", "+int b5 = 56;")
    st = orchestrate("patches", "status", check=True).stdout
    assert f"changed since applied {names[1]}" in " ".join(st.split())
    first_commit = git(v, "rev-parse", "HEAD~1")
    orchestrate("patches", "apply", check=True)
    assert "int b5 = 56;" in (v / "b.c").read_text()
    assert git(v, "rev-parse", "HEAD~1") == first_commit  # the unchanged first patch was kept


def test_check_against_pinned_and_other_versions(tiny_project):
    make_series(tiny_project)
    v = tiny_project["vendor"]
    before = snapshot(v)
    res = orchestrate("patches", "check", check=True)
    assert "all 2 patch(es) apply" in res.stdout
    res = orchestrate("patches", "check", "--git-url", tiny_project["upstream"], "--commit", tiny_project["v2"])
    assert res.returncode == 1
    assert "0001-Change-a3.patch: applied cleanly" in res.stdout
    assert "0002-Change-b5.patch: conflict" in res.stdout and "b.c" in res.stdout
    assert res.stderr.strip() == f"error: 1 of 2 patch(es) conflict with git {tiny_project['upstream']}@" \
                                 f"{tiny_project['v2']}: 0002-Change-b5.patch"
    assert snapshot(v) == before
    assert "worktree" not in git(v, "worktree", "list").split("\n", 1)[-1]


def _fake_sdist(tmp_path, version="9.9.9"):
    buf = io.BytesIO()
    top = f"llama_cpp_python-{version}"
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in ((f"{top}/setup.py", b"x"), (f"{top}/vendor/llama.cpp/.git", b"gitdir: ../x"),
                           (f"{top}/vendor/llama.cpp/a.c", b"int a;\n"), (f"{top}/vendor/llama.cpp/sub/b.h", b"int b;\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sdist_pin_is_verified_and_extracted(tiny_project, tmp_path):
    data = _fake_sdist(tmp_path)
    pin = upstream.sdist_pin("9.9.9", hashlib.sha256(data).hexdigest())
    cached = tmp_path / "cache" / "downloads" / pin.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    tree = tmp_path / "tree"
    upstream.materialize(pin, tree)
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == ["a.c", "sub", "sub/b.h"]
    bad = upstream.sdist_pin("9.9.9", "0" * 64)
    with pytest.raises(OrchestrateError, match="sha256 mismatch"):
        upstream.materialize(bad, tmp_path / "tree2")


def test_missing_series_entry_is_a_clear_error(tiny_project):
    (tiny_project["proj"] / "patches" / "series").write_text("0001-nothing.patch\n")
    res = orchestrate("patches", "list")
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {tiny_project['proj'] / 'patches' / 'series'}:1: patch file 0001-nothing.patch does not exist"
