"""Our patch series over the vendored llama.cpp: list, status, apply, unapply, export, check.

patches/series names the patches in order (one file name a line, `#` comments); each patch
is a `git format-patch` file whose commit message says what it does and why. Applied
patches are commits on top of the `upstream` tag; .git/orchestrate.json records which
file (by sha256) became which commit, so an edited patch file is noticed.
"""

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import git

from ..errors import OrchestrateError
from ..files import write_atomic
from . import upstream

SERIES = "series"
APPLIED, CHANGED, NOT_APPLIED = "applied", "changed since applied", "not applied"
KEEP_OR_DROP = ("commit them in vendor/llama.cpp and run `orchestrate patches export` to keep them, "
                "or run `orchestrate patches unapply --discard` to drop them")


@dataclass(frozen=True)
class Patch:
    name: str
    path: Path
    sha256: str
    subject: str


def _subject(text: str) -> str:
    m = re.search(r"^Subject: (?:\[PATCH[^\]]*\] )?(.*)$", text, re.M)
    return m.group(1).strip() if m else "(no subject)"


def read_series(pdir: Path) -> list[Patch]:
    series = pdir / SERIES
    if not series.exists():
        raise OrchestrateError(f"no patch series at {series}")
    out = []
    for lineno, line in enumerate(series.read_text(encoding="utf-8").splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = pdir / name
        if not path.is_file():
            raise OrchestrateError(f"{series}:{lineno}: patch file {name} does not exist")
        data = path.read_bytes()
        out.append(Patch(name, path, hashlib.sha256(data).hexdigest(), _subject(data.decode("utf-8", "replace"))))
    return out


@dataclass
class Status:
    patches: list[tuple[Patch, str]]
    dirty: list[str] = field(default_factory=list)      # uncommitted paths in the vendor tree
    foreign: list[str] = field(default_factory=list)    # commits that no patch file holds
    applied_commits: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.dirty or self.foreign)


def _dirty_paths(repo: git.Repo) -> list[str]:
    out = repo.git.status("--porcelain", "--untracked-files=all")
    return [line[3:] for line in out.splitlines() if line.strip()]


def status(repo: git.Repo, pdir: Path) -> Status:
    series = read_series(pdir)
    commits = upstream.commits_since_upstream(repo)
    recorded = upstream.read_state(repo)["applied"]
    # The recorded patches are valid as long as they are exactly the first commits.
    valid = []
    for rec, commit in zip(recorded, commits):
        if rec["commit"] != commit:
            break
        valid.append(rec)
    foreign = commits[len(valid):]
    states = []
    for i, p in enumerate(series):
        rec = valid[i] if i < len(valid) else None
        if rec and rec["name"] == p.name and rec["sha256"] == p.sha256:
            states.append((p, APPLIED))
        elif rec and rec["name"] == p.name:
            states.append((p, CHANGED))
        else:
            states.append((p, NOT_APPLIED))
    foreign_desc = [f"{c[:10]} {repo.commit(c).summary}" for c in foreign]
    return Status(states, _dirty_paths(repo), foreign_desc, [r["commit"] for r in valid])


AM_ARGS = ("--quiet", "--committer-date-is-author-date", "--whitespace=nowarn")


def failure_spots(output: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Where `git am` says a patch failed: (file, hunk line) pairs, and (file, why) for files
    that are missing or already there."""
    spots = re.findall(r"patch failed: (\S+):(\d+)", output)
    missing = re.findall(r"error: (\S+): (does not exist in index|No such file or directory|already exists in index)",
                         output)
    return spots, missing


def _failure_report(patch: Patch, output: str) -> str:
    spots, missing = failure_spots(output)
    if spots:
        where = "; ".join(f"{f}, hunk at line {n}" for f, n in spots)
    else:
        where = "; ".join(f"{f}: {why}" for f, why in missing) or (output.strip().splitlines() or ["?"])[0]
    return f"patch {patch.name} ({patch.subject}) does not apply: {where}"


def _am(repo: git.Repo, patch: Patch) -> str:
    """Apply one patch as a commit; return the new commit id or raise with a report."""
    try:
        repo.git.am(*AM_ARGS, str(patch.path.resolve()))
    except git.GitCommandError as e:
        report = _failure_report(patch, f"{e.stdout}\n{e.stderr}")
        try:
            repo.git.am("--abort")
        except git.GitCommandError:
            pass
        raise OrchestrateError(report) from None
    return repo.head.commit.hexsha


def refuse_drift(st: Status, what: str) -> None:
    if st.drifted:
        found = []
        if st.dirty:
            found.append(f"{len(st.dirty)} uncommitted change(s) (e.g. {st.dirty[0]})")
        if st.foreign:
            found.append(f"{len(st.foreign)} commit(s) no patch holds (e.g. {st.foreign[0]})")
        raise OrchestrateError(f"refusing to {what}: vendor/llama.cpp has {' and '.join(found)}; {KEEP_OR_DROP}")


def apply_series(repo: git.Repo, pdir: Path) -> list[str]:
    """Bring the tree to exactly upstream + series; return the names applied now.

    Patches already applied unchanged at the front of the series are kept (so files they
    touch keep their timestamps and an incremental build stays small). On any failure
    the tree and the state are put back exactly as they were.
    """
    st = status(repo, pdir)
    refuse_drift(st, "apply patches")
    keep = 0
    while keep < len(st.patches) and st.patches[keep][1] == APPLIED:
        keep += 1
    extra = len(st.applied_commits) > keep
    todo = [p for p, _ in st.patches[keep:]]
    if not todo and not extra:
        return []
    orig_head = repo.head.commit.hexsha
    orig_state = upstream.read_state(repo)
    base = st.applied_commits[keep - 1] if keep else upstream.UPSTREAM_TAG
    applied = orig_state["applied"][:keep]
    try:
        repo.git.reset("--hard", "--quiet", base)
        for p in todo:
            applied.append({"name": p.name, "sha256": p.sha256, "commit": _am(repo, p)})
    except BaseException:
        repo.git.reset("--hard", "--quiet", orig_head)
        upstream.write_state(repo, orig_state)
        raise
    upstream.write_state(repo, {**orig_state, "applied": applied})
    return [p.name for p in todo]


def unapply(repo: git.Repo, pdir: Path, discard: bool = False) -> None:
    """Back to pristine upstream. User edits are refused unless discard=True."""
    if not discard:
        refuse_drift(status(repo, pdir), "unapply")
    repo.git.reset("--hard", "--quiet", upstream.UPSTREAM_TAG)
    repo.git.clean("-fdq")
    state = upstream.read_state(repo)
    upstream.write_state(repo, {**state, "applied": []})


def export(repo: git.Repo, pdir: Path) -> list[str]:
    """Write the commits on top of upstream back into patches/ and the series file."""
    st = status(repo, pdir)
    if st.dirty:
        raise OrchestrateError(
            f"vendor/llama.cpp has uncommitted changes (e.g. {st.dirty[0]}): commit them first, "
            "each patch is one commit")
    old = [p.name for p, _ in st.patches]
    with tempfile.TemporaryDirectory(dir=pdir) as tmp:
        # --zero-commit, --full-index and --no-signature make the files depend only on the
        # commits, not on commit ids, repository size or the git version.
        out = repo.git.format_patch("--zero-commit", "--full-index", "--no-signature", "-N",
                                    "-o", tmp, f"{upstream.UPSTREAM_TAG}..HEAD")
        files = [Path(line.strip()) for line in out.splitlines() if line.strip()]
        names = [f.name for f in files]
        for f in files:
            f.replace(pdir / f.name)
    write_atomic(pdir / SERIES, "".join(n + "\n" for n in names))
    for name in set(old) - set(names):
        (pdir / name).unlink(missing_ok=True)
    commits = upstream.commits_since_upstream(repo)
    state = upstream.read_state(repo)
    upstream.write_state(repo, {**state, "applied": [
        {"name": p.name, "sha256": p.sha256, "commit": c} for p, c in zip(read_series(pdir), commits)]})
    return names


def footprint(series: list[Patch]) -> list[tuple[int, int]]:
    """Per patch, (lines changed in upstream files, lines in our own files): our own files are
    the ones some patch of the series creates."""
    own = set()
    diffs = []
    for p in series:
        text = p.path.read_text(encoding="utf-8", errors="replace")
        files = re.split(r"^diff --git a/\S+ b/(\S+)$", text, flags=re.M)[1:]
        per_file = list(zip(files[::2], files[1::2]))
        own |= {f for f, body in per_file if re.search(r"^new file mode", body, re.M)}
        diffs.append(per_file)
    out = []
    for per_file in diffs:
        counts = {True: 0, False: 0}
        for f, body in per_file:
            changed = len(re.findall(r"^[+-](?![+-]{2} )", body, re.M))
            counts[f in own] += changed
        out.append((counts[False], counts[True]))
    return out
