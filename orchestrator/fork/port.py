"""Moving the patch series to another upstream llama.cpp.

A new upstream is laid down as a commit whose parent is the current pristine upstream, so
git holds both sides and every patch can be replayed with a 3-way merge. The replay goes
patch by patch and reports each one: applied cleanly, merged (3-way), or conflict (files
and hunks), and for later patches whether they share files with a conflicting one.

`patches check` replays in a temporary clone and leaves vendor/ alone. `upstream bump`
replays in vendor/llama.cpp itself and stops on a conflict like `git rebase`: conflict
markers in the files, then `upstream continue` (after resolving and staging) or `upstream
abort` (back exactly to the state before the bump). The bump's own state is one JSON file
in vendor/.git, written atomically before every step, and the progress of the replay is
read from the repository (how many commits sit on the new upstream), so a bump cut short by
Ctrl-C or kill -9 can always be continued or aborted. The pin changes only at the very end,
when the new fork has been exported, built and has passed the canary.
"""

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import git
import yaml

from .. import paths
from ..errors import OrchestrateError
from ..files import read_json, read_text, write_atomic, write_json
from . import patches as patches_mod
from . import upstream

CLEAN, MERGED, BY_HAND, CONFLICT = "applied cleanly", "merged (3-way)", "resolved by hand", "conflict"
BACKUP = "orchestrate-bump-patches"   # in vendor/.git: patches/ as it was before the bump
BEFORE_REF = "refs/orchestrate/before-bump"


@dataclass
class PatchResult:
    name: str
    outcome: str                                       # CLEAN, MERGED, BY_HAND, CONFLICT
    files: list[str] = field(default_factory=list)      # files in conflict
    detail: str = ""
    shares_with: dict[str, list[str]] = field(default_factory=dict)  # conflicting patch -> shared files

    def line(self) -> str:
        text = f"{self.name}: {self.outcome}"
        if self.files:
            text += f" in {', '.join(self.files)}"
        if self.detail:
            text += f" ({self.detail})"
        for other, shared in self.shares_with.items():
            text += f"; depends on {other} (both change {', '.join(shared)})"
        return text


def patch_files(patch: patches_mod.Patch) -> set[str]:
    """The files a patch touches (both sides of renames)."""
    pairs = re.findall(r"^diff --git a/(\S+) b/(\S+)$", read_text(patch.path), re.M)
    return {f for pair in pairs for f in pair}


def mark_dependencies(series: list[patches_mod.Patch], results: list[PatchResult]) -> None:
    """Note, on each patch after a conflicting one, the files they both change."""
    order = {p.name: i for i, p in enumerate(series)}
    files = {p.name: patch_files(p) for p in series}
    for c in [r.name for r in results if r.outcome == CONFLICT]:
        for r in results:
            shared = sorted(files[c] & files[r.name]) if order[r.name] > order[c] else []
            if shared:
                r.shares_with[c] = shared


# ---- git plumbing ----------------------------------------------------------------------

def new_upstream_commit(repo: git.Repo, pin: upstream.Pin, parent: str) -> str:
    """A commit holding the pristine tree of `pin` whose parent is `parent`; the working tree
    and index of `repo` are not touched."""
    with tempfile.TemporaryDirectory(prefix="orchestrate-upstream-") as tmp:
        tree = Path(tmp) / "tree"
        upstream.materialize(pin, tree)
        env = {**os.environ, **upstream.GIT_ENV, "GIT_INDEX_FILE": str(Path(tmp) / "index"),
               "GIT_AUTHOR_DATE": upstream.FIXED_DATE, "GIT_COMMITTER_DATE": upstream.FIXED_DATE}
        base = ["git", "--git-dir", repo.git_dir, "--work-tree", str(tree)]
        run = lambda *a: subprocess.run([*base, *a], cwd=tree, env=env, check=True, capture_output=True,  # noqa: E731
                                        text=True).stdout.strip()
        try:
            run("add", "--all", "--force", ".")
            tree_id = run("write-tree")
            return run("commit-tree", tree_id, "-p", parent, "-m", f"upstream llama.cpp: {pin.ident()}")
        except subprocess.CalledProcessError as e:
            raise OrchestrateError(f"could not record upstream {pin.ident()}: {e.stderr.strip()}") from None


def _unmerged(repo: git.Repo) -> list[str]:
    return sorted(set(repo.git.diff("--name-only", "--diff-filter=U").split()))


def am_in_progress(repo: git.Repo) -> bool:
    return (Path(repo.git_dir) / "rebase-apply").exists()


def apply_one(repo: git.Repo, patch: patches_mod.Patch) -> PatchResult:
    """Apply one patch as a commit: plainly if it can, else with a 3-way merge. On a conflict the
    `git am` is left in progress, with conflict markers where git could merge at all."""
    try:
        repo.git.am(*patches_mod.AM_ARGS, str(patch.path.resolve()))
        return PatchResult(patch.name, CLEAN)
    except git.GitCommandError as e:
        plain = f"{e.stdout}\n{e.stderr}"
        repo.git.am("--abort")
    try:
        repo.git.am("-3", *patches_mod.AM_ARGS, str(patch.path.resolve()))
        return PatchResult(patch.name, MERGED)
    except git.GitCommandError as e:
        out = f"{e.stdout}\n{e.stderr}"
    files = _unmerged(repo)
    if files:
        return PatchResult(patch.name, CONFLICT, files, "conflict markers in the files")
    # no merge was possible (e.g. a file the patch changes is gone): say where it failed
    spots, missing = patches_mod.failure_spots(plain)
    if not spots:
        spots = patches_mod.failure_spots(out)[0]
    missing += patches_mod.failure_spots(out)[1]
    where = [f"{f} (hunk at line {n})" for f, n in spots] + [f"{f} ({why})" for f, why in missing]
    reason = "; ".join(where) or ((out.strip().splitlines() or ["?"])[-1])
    return PatchResult(patch.name, CONFLICT, sorted({f for f, _ in spots} | {f for f, _ in missing}),
                       f"no 3-way merge possible: {reason}; apply it by hand")


# ---- patches check: a replay in a temporary clone ---------------------------------------

def check(pdir: Path, pin: upstream.Pin, current: upstream.Pin, vendor: Path | None = None) -> list[PatchResult]:
    """Replay the series onto `pin` with 3-way merges, every patch (a conflicting one is left
    out and the rest go on), in a temporary repository: vendor/ is not touched."""
    series = patches_mod.read_series(pdir)
    with tempfile.TemporaryDirectory(prefix="orchestrate-check-") as tmp:
        tree = Path(tmp) / "tree"
        if vendor and (vendor / ".git").exists() and \
                upstream.read_state(upstream.open_repo(vendor)).get("pin") == current.ident():
            git.Repo.clone_from(str(vendor), tree, shared=True, no_checkout=True)
            repo = upstream.open_repo(tree)
        else:
            upstream.materialize(current, tree)
            repo = upstream.init_repo(tree, current)
        old = repo.git.rev_parse(f"{upstream.UPSTREAM_TAG}^{{commit}}")
        repo.git.reset("--hard", "--quiet", old)
        upstream.write_state(repo, {"pin": current.ident(), "applied": []})
        patches_mod.apply_series(repo, pdir)  # the series' own blobs: the 3-way merges' base
        start = old if pin.ident() == current.ident() else new_upstream_commit(repo, pin, old)
        repo.git.reset("--hard", "--quiet", start)
        results = []
        for p in series:
            r = apply_one(repo, p)
            if r.outcome == CONFLICT:
                repo.git.am("--abort")
            results.append(r)
    mark_dependencies(series, results)
    return results


# ---- upstream bump -----------------------------------------------------------------------

def _bump_path(repo: git.Repo) -> Path:
    return Path(repo.git_dir) / upstream.BUMP_FILE


def read_bump(repo: git.Repo) -> dict | None:
    path = _bump_path(repo)
    return read_json(path) if path.exists() else None


def pin_to_dict(pin: upstream.Pin) -> dict:
    return {k: getattr(pin, k) for k in ("source", "package", "version", "filename", "sha256", "subdir", "url", "commit")}


def start(repo: git.Repo, pdir: Path, pin: upstream.Pin, pin_file: Path) -> list[PatchResult]:
    """Begin a bump of vendor/ to `pin` and replay the series; raises Stopped on a conflict."""
    if read_bump(repo):
        raise OrchestrateError("an upstream bump is already in progress: `orchestrate upstream continue` "
                               "or `orchestrate upstream abort`")
    patches_mod.refuse_drift(patches_mod.status(repo, pdir), "bump the upstream")
    backup = Path(repo.git_dir) / BACKUP
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(pdir, backup)
    head = repo.head.commit.hexsha
    state = {"phase": "preparing", "pin": pin_to_dict(pin), "results": [],
             "before": {"head": head, "upstream": repo.git.rev_parse(f"{upstream.UPSTREAM_TAG}^{{commit}}"),
                        "state": upstream.read_state(repo), "pin_text": read_text(pin_file)}}
    write_json(_bump_path(repo), state)
    repo.git.update_ref(BEFORE_REF, head)
    try:
        patches_mod.apply_series(repo, pdir)  # the series' own blobs are the 3-way merges' base
        new = new_upstream_commit(repo, pin, state["before"]["upstream"])
    except OrchestrateError:  # e.g. the new upstream cannot be fetched: nothing to continue
        abort(repo, pdir, pin_file)
        raise
    state.update(phase="replaying", new_upstream=new)
    write_json(_bump_path(repo), state)
    repo.git.reset("--hard", "--quiet", new)
    repo.git.tag("-f", upstream.UPSTREAM_TAG, new)
    upstream.write_state(repo, {"pin": pin.ident(), "applied": []})
    return replay_rest(repo, pdir, state)


class Stopped(OrchestrateError):
    """A bump stopped on a conflict; `report` lists every patch."""

    def __init__(self, message: str, report: list[str]):
        super().__init__(message)
        self.report = report


def replay_rest(repo: git.Repo, pdir: Path, state: dict) -> list[PatchResult]:
    """Apply the patches not yet on the new upstream (read from the repository, so an
    interrupted bump resumes where it was)."""
    series = patches_mod.read_series(Path(repo.git_dir) / BACKUP)
    results = [PatchResult(**r) for r in state["results"]]
    done = len(upstream.commits_since_upstream(repo))
    for p in series[done:]:
        r = apply_one(repo, p)
        results = [x for x in results if x.name != r.name] + [r]
        state["results"] = [vars(x) for x in results]
        if r.outcome == CONFLICT:
            state["phase"] = "conflict"
            write_json(_bump_path(repo), state)
            later = [PatchResult(q.name, "waiting") for q in series[series.index(p) + 1:]]
            mark_dependencies(series, results + later)
            raise Stopped(f"{p.name} conflicts with the new upstream ({', '.join(r.files) or 'see above'}): resolve "
                          f"in {repo.working_dir}, `git add` the files, then `orchestrate upstream continue` "
                          "(or `orchestrate upstream abort`)", [x.line() for x in results + later])
        write_json(_bump_path(repo), state)
    state["phase"] = "replayed"
    write_json(_bump_path(repo), state)
    mark_dependencies(series, results)
    return results


def resume(repo: git.Repo, pdir: Path, pin_file: Path) -> list[PatchResult]:
    """`upstream continue`: finish the patch being resolved (or redo one cut short), then the rest."""
    state = read_bump(repo)
    if state is None:
        raise OrchestrateError("no upstream bump is in progress")
    if state["phase"] == "preparing":  # cut short before the new upstream was recorded: start again
        pin = upstream.Pin(**state["pin"])
        abort(repo, pdir, pin_file)
        return start(repo, pdir, pin, pin_file)
    if am_in_progress(repo):
        unmerged = _unmerged(repo)
        if unmerged:
            raise OrchestrateError(f"still in conflict: {', '.join(unmerged)}; resolve them and `git add` them, "
                                   "then `orchestrate upstream continue`")
        staged = repo.git.diff("--cached", "--name-only")
        if staged:  # the user's resolution: commit it as the patch
            repo.git.am("--continue")
            name = patches_mod.read_series(Path(repo.git_dir) / BACKUP)[len(upstream.commits_since_upstream(repo)) - 1].name
            state["results"] = [r for r in state["results"] if r["name"] != name] + [vars(PatchResult(name, BY_HAND))]
        else:  # cut short before anything was applied: try that patch again
            repo.git.am("--abort")
    state["phase"] = "replaying"
    write_json(_bump_path(repo), state)
    return replay_rest(repo, pdir, state)


def finish(repo: git.Repo, pdir: Path, pin_file: Path, build_and_check) -> upstream.Pin:
    """Export the replayed series, build and run the canary (`build_and_check(pin)`), and only
    then write the new pin. A failure leaves the bump in progress (fix, then continue; or abort)."""
    state = read_bump(repo)
    pin = upstream.Pin(**state["pin"])
    patches_mod.export(repo, pdir)
    upstream.write_state(repo, {**upstream.read_state(repo), "pin": pin.ident()})
    build_and_check(pin)
    write_atomic(pin_file, pin_text(pin, state["before"]["pin_text"]))
    repo.git.update_ref("-d", BEFORE_REF)
    shutil.rmtree(Path(repo.git_dir) / BACKUP, ignore_errors=True)
    _bump_path(repo).unlink()
    return pin


def abort(repo: git.Repo, pdir: Path, pin_file: Path) -> None:
    """Back exactly to the state before the bump: HEAD, files, upstream tag, patches/, pin."""
    state = read_bump(repo)
    if state is None:
        raise OrchestrateError("no upstream bump is in progress")
    if am_in_progress(repo):
        repo.git.am("--abort")
    before = state["before"]
    repo.git.reset("--hard", "--quiet", before["head"])
    repo.git.clean("-fdq")
    repo.git.tag("-f", upstream.UPSTREAM_TAG, before["upstream"])
    upstream.write_state(repo, before["state"])
    backup = Path(repo.git_dir) / BACKUP
    if backup.exists():
        for f in pdir.iterdir():
            if f.is_file() and not (backup / f.name).exists():
                f.unlink()
        for f in backup.iterdir():
            write_atomic(pdir / f.name, f.read_bytes())
        shutil.rmtree(backup)
    if read_text(pin_file) != before["pin_text"]:
        write_atomic(pin_file, before["pin_text"])
    try:
        repo.git.update_ref("-d", BEFORE_REF)
    except git.GitCommandError:
        pass
    _bump_path(repo).unlink()


def pin_text(pin: upstream.Pin, old_text: str) -> str:
    """conf/upstream.yaml for `pin`, keeping the file's comments and the other source's entry."""
    old = yaml.safe_load(old_text) or {}
    header = "".join(line + "\n" for line in old_text.splitlines() if line.startswith("#"))
    data = {"source": pin.source, "sdist": old.get("sdist") or {}, "git": old.get("git") or {"url": "", "commit": ""}}
    if pin.source == "sdist":
        data["sdist"] = {"package": pin.package, "version": pin.version, "filename": pin.filename,
                         "sha256": pin.sha256, "subdir": pin.subdir}
    else:
        data["git"] = {"url": pin.url, "commit": pin.commit}
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def resolve_sha256(pin: upstream.Pin) -> upstream.Pin:
    """An sdist pin without a sha256 gets the sha256 of its download (trust on first use)."""
    if pin.source != "sdist" or pin.sha256:
        return pin
    from ..fetch import fetch_package, sha256_of
    archive = fetch_package(pin.package, pin.version, pin.filename, None, sdist=True)
    return upstream.Pin(**{**pin_to_dict(pin), "sha256": sha256_of(archive)})


def vendor_repo() -> git.Repo:
    vendor = paths.vendor_dir()
    if not (vendor / ".git").exists():
        raise OrchestrateError(f"{vendor} does not exist: run `orchestrate build` first")
    return upstream.open_repo(vendor)
