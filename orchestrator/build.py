"""Configure and compile the fork with CMake; a stamp of the inputs makes a no-op build instant."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import patches, paths, upstream
from .errors import OrchestrateError
from .runner import Progress, run_logged

TARGETS = ["llama-quantize", "llama-perplexity"]  # the shared libraries come with them
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
]
STAMP = "orchestrate-stamp.json"
LOG = "build.log"


@dataclass(frozen=True)
class Fork:
    """Where the built binaries are, and what they were built from."""
    build_dir: Path
    stamp: dict

    def binary(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    @property
    def id(self) -> str:
        return self.stamp["id"]


def require_tools() -> None:
    for tool, what in (("cmake", "cmake"), ("git", "git")):
        if not shutil.which(tool):
            raise OrchestrateError(f"{what} is not installed (needed to build the fork); install it and retry")
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        raise OrchestrateError("no C/C++ compiler found (install gcc/g++ or clang) to build the fork")


def cmake_options() -> list[str]:
    opts = list(CMAKE_OPTIONS)
    opts.append("-G" + ("Ninja" if shutil.which("ninja") else "Unix Makefiles"))
    if shutil.which("ccache"):
        opts += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    return opts


def inputs_stamp(repo, pin: upstream.Pin, opts: list[str]) -> dict:
    """Everything that determines the binaries: the pin, the exact source tree, the options."""
    tree = repo.git.rev_parse("HEAD^{tree}")
    diff = repo.git.diff("HEAD", "--binary")  # a developer's uncommitted edits count too
    untracked = repo.git.ls_files("--others", "--exclude-standard")
    stamp = {
        "pin": pin.ident(),
        "tree": tree,
        "uncommitted": hashlib.sha256((diff + "\0" + untracked).encode()).hexdigest() if (diff or untracked) else None,
        "cmake_options": opts,
        "applied": [a["name"] for a in upstream.read_state(repo)["applied"]],
    }
    stamp["id"] = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    return stamp


def _percent(line: str) -> int | None:
    m = re.match(r"\[\s*(\d+)/(\d+)\]", line)  # ninja
    if m:
        return 100 * int(m.group(1)) // int(m.group(2))
    m = re.match(r"\[\s*(\d+)%\]", line)  # make
    return int(m.group(1)) if m else None


def _run(cmd: list[str], log, what: str, progress: Progress | None) -> None:
    def on_line(line):
        pct = _percent(line)
        if progress and pct is not None:
            progress.show(f"{what}: {pct:3d}%")
    # ccache keyed on paths relative to the project, so a fresh clone elsewhere still hits
    env = {**os.environ, "CCACHE_BASEDIR": str(paths.project()), "CCACHE_NOHASHDIR": "true"}
    rc, _ = run_logged(cmd, log, on_line, env=env)
    if progress:
        progress.done()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)


def build(pin: upstream.Pin | None = None, jobs: int | None = None, quiet: bool = False) -> Fork:
    """Fetch if needed, apply the series, compile. Returns the built fork."""
    require_tools()
    pin = pin or upstream.load_pin()
    repo = upstream.ensure_vendor(pin)
    pdir = paths.patches_dir()
    st = patches.status(repo, pdir)
    if st.drifted:
        # A developer editing the fork: build what is there, never throw edits away.
        print("warning: vendor/llama.cpp has edits no patch holds; building the tree as it is "
              "(`orchestrate patches status` for details)", file=sys.stderr)
    else:
        done = patches.apply_series(repo, pdir)
        if done and not quiet:
            print(f"applied {len(done)} patch(es): {', '.join(done)}", file=sys.stderr)
    bdir = paths.build_dir()
    opts = cmake_options()
    stamp = inputs_stamp(repo, pin, opts)
    stamp_path = bdir / STAMP
    fork = Fork(bdir, stamp)
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and all(
            fork.binary(t).exists() for t in TARGETS):
        if not quiet:
            print(f"fork is up to date ({bdir})", file=sys.stderr)
        return fork

    bdir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # an interrupted build must not look finished
    log_path = bdir / LOG
    jobs = jobs or os.cpu_count() or 1
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        try:
            _run(["cmake", "-S", str(repo.working_dir), "-B", str(bdir), *opts], log, "configure", None)
            _run(["cmake", "--build", str(bdir), "--parallel", str(jobs), "--target", *TARGETS],
                 log, "build", None if quiet else Progress())
        except subprocess.CalledProcessError:
            log.flush()
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise OrchestrateError(f"build of the fork failed; full log: {log_path}") from None
    tmp = stamp_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    tmp.replace(stamp_path)
    if not quiet:
        print(f"built fork {stamp['id']} in {time.monotonic() - t0:.0f} s; log: {log_path}", file=sys.stderr)
    return fork


def current() -> Fork:
    """The fork as last built, without building (error if there is none)."""
    stamp_path = paths.build_dir() / STAMP
    if not stamp_path.exists():
        raise OrchestrateError("the fork is not built yet: run `orchestrate build`")
    fork = Fork(paths.build_dir(), json.loads(stamp_path.read_text()))
    for t in TARGETS:
        if not fork.binary(t).exists():
            raise OrchestrateError(f"{fork.binary(t)} is missing: run `orchestrate build`")
    return fork
