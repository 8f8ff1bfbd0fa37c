"""The pinned upstream llama.cpp: read the pin, fetch it, lay it down as a git repository.

Whatever the source (sdist or git), the vendor tree becomes a fresh git repository whose
first commit is the pristine upstream tree, tagged `upstream`, so every later change
(our patches, a developer's edits) is visible with plain git.
"""

import io
import logging
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import git
import yaml

from .. import paths
from ..errors import OrchestrateError
from ..fetch import fetch_package
from ..files import read_json, write_json

logger = logging.getLogger(__name__)

UPSTREAM_TAG = "upstream"
STATE_FILE = "orchestrate.json"  # inside .git/: which patches are applied as which commits
BUMP_FILE = "orchestrate-bump.json"  # inside .git/: an upstream bump in progress (fork/port.py)

# Commits we make are reproducible: fixed identity, fixed date for the upstream commit,
# committer date = author date for applied patches.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "orchestrate",
    "GIT_AUTHOR_EMAIL": "orchestrate@localhost",
    "GIT_COMMITTER_NAME": "orchestrate",
    "GIT_COMMITTER_EMAIL": "orchestrate@localhost",
    # read-only queries (status) must not rewrite .git/index: llama.cpp's build watches it
    "GIT_OPTIONAL_LOCKS": "0",
}
FIXED_DATE = "2000-01-01T00:00:00+0000"


@dataclass(frozen=True)
class Pin:
    source: str                # "sdist" or "git"
    package: str = ""
    version: str = ""
    filename: str = ""
    sha256: str | None = None
    subdir: str = "vendor/llama.cpp"
    url: str = ""
    commit: str = ""

    def ident(self) -> str:
        if self.source == "sdist":
            return f"{self.package}=={self.version} sha256:{self.sha256 or 'unverified'}"
        return f"git {self.url}@{self.commit}"


def pin_file() -> Path:
    return paths.conf_dir() / "upstream.yaml"


def load_pin(path: Path | None = None) -> Pin:
    path = path or pin_file()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise OrchestrateError(f"cannot read upstream pin {path}: {e}") from None
    source = (data or {}).get("source")
    if source == "sdist":
        s = data.get("sdist") or {}
        missing = [k for k in ("package", "version", "filename", "sha256") if not s.get(k)]
        if missing:
            raise OrchestrateError(f"{path}: sdist pin lacks {', '.join(missing)}")
        return Pin("sdist", package=s["package"], version=str(s["version"]), filename=s["filename"],
                   sha256=s["sha256"], subdir=s.get("subdir", "vendor/llama.cpp"))
    if source == "git":
        g = data.get("git") or {}
        if not g.get("url") or len(str(g.get("commit", ""))) != 40:
            raise OrchestrateError(f"{path}: git pin needs a url and a full 40-hex commit id")
        return Pin("git", url=g["url"], commit=str(g["commit"]))
    raise OrchestrateError(f"{path}: source must be 'sdist' or 'git', not {source!r}")


def sdist_pin(version: str, sha256: str | None, package: str = "llama-cpp-python") -> Pin:
    """A pin for another sdist version, e.g. for `patches check --sdist-version`."""
    filename = f"{package.replace('-', '_')}-{version}.tar.gz"
    return Pin("sdist", package=package, version=version, filename=filename, sha256=sha256)


def _extract_subdir(archive: Path, subdir: str, dest: Path) -> None:
    """Extract <top>/<subdir>/ of a .tar.gz into dest, leaving out any .git entry."""
    n = 0
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2 or not (parts[1] + "/").startswith(subdir.rstrip("/") + "/"):
                continue
            rel = parts[1][len(subdir.rstrip("/")) + 1:]
            if not rel or rel == ".git" or rel.startswith(".git/"):
                continue
            m.name = rel
            members.append(m)
        for m in members:
            tar.extract(m, dest, filter="data")
            n += 1
    if n == 0:
        raise OrchestrateError(f"{archive.name} has no {subdir}/ tree")


def _export_git(url: str, commit: str, dest: Path) -> None:
    """Write the tree of url@commit (no .git) into dest."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            repo = git.Repo.clone_from(url, Path(tmp) / "clone", no_checkout=True)
            data = repo.git.archive(commit, format="tar", stdout_as_string=False)
        except git.GitCommandError as e:
            raise OrchestrateError(f"cannot fetch {url}@{commit}: {e.stderr.strip() or e}") from None
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")


def materialize(pin: Pin, dest: Path) -> None:
    """Write the pristine upstream tree of `pin` into the (new, empty) directory dest."""
    dest.mkdir(parents=True)
    if pin.source == "sdist":
        archive = fetch_package(pin.package, pin.version, pin.filename, pin.sha256, sdist=True)
        _extract_subdir(archive, pin.subdir, dest)
    else:
        _export_git(pin.url, pin.commit, dest)


def open_repo(path: Path) -> git.Repo:
    repo = git.Repo(path)
    repo.git.update_environment(**GIT_ENV)
    return repo


def init_repo(tree: Path, pin: Pin) -> git.Repo:
    """Turn a pristine tree into a repository whose first commit is upstream."""
    repo = git.Repo.init(tree)
    repo.git.update_environment(**GIT_ENV)
    with repo.config_writer() as cw:
        cw.set_value("core", "autocrlf", "false")
        cw.set_value("gc", "auto", "0")
    repo.git.add("--all", "--force", ".")
    repo.git.commit("--quiet", "--no-verify", "-m", f"upstream llama.cpp: {pin.ident()}",
                    env={**GIT_ENV, "GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE})
    repo.git.tag(UPSTREAM_TAG)
    write_state(repo, {"pin": pin.ident(), "applied": []})
    return repo


def commits_since_upstream(repo: git.Repo) -> list[str]:
    """Commit ids on top of the pristine upstream commit, oldest first."""
    out = repo.git.rev_list("--reverse", f"{UPSTREAM_TAG}..HEAD")
    return out.split()


def read_state(repo: git.Repo) -> dict:
    path = Path(repo.git_dir) / STATE_FILE
    if not path.exists():
        return {"pin": None, "applied": []}
    return read_json(path)


def write_state(repo: git.Repo, state: dict) -> None:
    write_json(Path(repo.git_dir) / STATE_FILE, state)


def bump_in_progress(vendor: Path) -> bool:
    return (vendor / ".git" / BUMP_FILE).exists()


def ensure_vendor(pin: Pin, vendor: Path | None = None) -> git.Repo:
    """Return the vendor repository for `pin`, creating it if needed.

    A vendor tree for another pin is replaced only when it holds nothing of the user's
    (no uncommitted edits); otherwise this refuses and says how to proceed.
    """
    vendor = vendor or paths.vendor_dir()
    if (vendor / ".git").exists():
        repo = open_repo(vendor)
        if read_state(repo).get("pin") == pin.ident():
            return repo
        if bump_in_progress(vendor):
            raise OrchestrateError(f"an upstream bump is in progress in {vendor}: finish it with `orchestrate upstream "
                                   "continue` or undo it with `orchestrate upstream abort`")
        recorded = [a["commit"] for a in read_state(repo)["applied"]]
        if repo.is_dirty(untracked_files=True) or commits_since_upstream(repo) != recorded:
            raise OrchestrateError(
                f"{vendor} is for another upstream pin and holds edits no patch has: "
                "commit and `orchestrate patches export` them, or remove the directory")
        logger.info(f"upstream pin changed; replacing {vendor}")
        shutil.rmtree(vendor)
    elif vendor.exists():
        raise OrchestrateError(f"{vendor} exists but is not a git repository: remove it and run again")
    # Build in a sibling temp dir and rename, so an interrupted fetch leaves no half tree.
    vendor.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=vendor.parent))
    try:
        logger.info(f"laying down upstream {pin.ident()} ...")
        materialize(pin, tmp / "tree")
        init_repo(tmp / "tree", pin)
        (tmp / "tree").rename(vendor)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_repo(vendor)
