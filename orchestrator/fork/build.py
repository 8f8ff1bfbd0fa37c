"""Configure and compile the fork with CMake; a stamp of the inputs makes a no-op build instant.

The fork's identity (its id, part of every run's cache key) is what determines the
binaries: the pin, the exact source tree (untracked files by content), the CMake options.
Build tooling (ninja or make, ccache) is not part of it: installing either neither changes
the identity nor breaks an existing build directory.
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import OrchestrateError
from ..files import read_json, read_text, write_json
from ..proc import Progress, run_logged
from . import patches, upstream

logger = logging.getLogger(__name__)

TARGETS = ["llama-quantize", "llama-perplexity", "llama-tokenize", "llama-imatrix"]  # the shared libraries come with them
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # A portable x86-64-v3 / generic build instead of -march=native: the same code (and so the
    # same numbers) on every machine, and no AMX kernels, which crash or compute wrong Q4_0/Q4_1
    # matmuls on AMX CPUs (llama.cpp issues 20824 and 16315).
    "-DGGML_NATIVE=OFF",
]
# Backends for llama-perplexity (quantization, with the hooks, always runs on the CPU path). Each is
# built in its own directory, side by side; its options are part of the fork's identity.
BACKENDS = {
    "cpu": [],
    "blas": ["-DGGML_BLAS=ON", "-DGGML_BLAS_VENDOR=OpenBLAS"],
    "cuda": ["-DGGML_CUDA=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
    "metal": ["-DGGML_METAL=ON"],
}
GPU_BACKENDS = ("cuda", "vulkan", "metal")
NEEDS = {"blas": "OpenBLAS (Debian/Ubuntu: apt-get install libopenblas-dev pkg-config)",
         "cuda": "the CUDA toolkit (nvcc on PATH)", "vulkan": "the Vulkan SDK (libvulkan-dev, glslc)",
         "metal": "macOS with Xcode's command-line tools"}
STAMP = "orchestrate-stamp.json"
CONFIGURED = "orchestrate-configured.json"  # the CMake options the build directory's cache was made with
LOG = "build.log"


@dataclass(frozen=True)
class Fork:
    """Where the built binaries are, and what they were built from."""
    build_dir: Path
    stamp: dict

    def binary(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    @property
    def backend(self) -> str:
        opts = self.stamp["cmake_options"]
        return next((b for b, o in BACKENDS.items() if o and all(x in opts for x in o)), "cpu")

    @property
    def gpu(self) -> bool:
        return self.backend in GPU_BACKENDS

    @property
    def id(self) -> str:
        return self.stamp["id"]


def require_tools() -> None:
    for tool, what in (("cmake", "cmake"), ("git", "git")):
        if not shutil.which(tool):
            raise OrchestrateError(f"{what} is not installed (needed to build the fork); install it and retry")
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        raise OrchestrateError("no C/C++ compiler found (install gcc/g++ or clang) to build the fork")


def _cached_generator(bdir: Path) -> str | None:
    """The generator an existing build directory was configured with (CMake refuses another)."""
    try:
        text = read_text(bdir / "CMakeCache.txt")
    except OSError:
        return None
    m = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", text, re.M)
    return m.group(1).strip() if m else None


def tooling(bdir: Path) -> list[str]:
    """Generator and compiler launcher: how to build, not what. The generator of an existing
    build directory is kept while its tool is still installed; otherwise it starts afresh."""
    gen = _cached_generator(bdir)
    if gen and not shutil.which("ninja" if gen == "Ninja" else "make"):
        (bdir / "CMakeCache.txt").unlink(missing_ok=True)
        shutil.rmtree(bdir / "CMakeFiles", ignore_errors=True)
        gen = None
    opts = ["-G" + (gen or ("Ninja" if shutil.which("ninja") else "Unix Makefiles"))]
    launcher = "ccache" if shutil.which("ccache") else ""
    opts += [f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}"]
    return opts


def _untracked_digest(repo) -> str | None:
    """sha256 over the names and contents of untracked source files (None when there are none)."""
    h = hashlib.sha256()
    names = sorted(n for n in repo.git.ls_files("--others", "--exclude-standard", "-z").split("\0") if n)
    if not names:
        return None
    for name in names:
        h.update(name.encode() + b"\0")
        try:
            h.update(Path(repo.working_dir, name).read_bytes())
        except OSError as e:  # a dangling link, a file removed meanwhile: still a difference
            h.update(f"unreadable:{e.errno}".encode())
        h.update(b"\0")
    return h.hexdigest()


def inputs_stamp(repo, pin: upstream.Pin, opts: list[str]) -> dict:
    """Everything that determines the binaries: the pin, the exact source tree, the options."""
    tree = repo.git.rev_parse("HEAD^{tree}")
    diff = repo.git.diff("HEAD", "--binary")  # a developer's uncommitted edits count too
    untracked = _untracked_digest(repo)
    stamp = {
        "pin": pin.ident(),
        "tree": tree,
        "uncommitted": hashlib.sha256((diff + "\0" + (untracked or "")).encode()).hexdigest()
        if (diff or untracked) else None,
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


def build_dir(backend: str = "cpu") -> Path:
    """vendor/build for the CPU backend, vendor/build-<backend> for the others."""
    if backend not in BACKENDS:
        raise OrchestrateError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return paths.build_dir() if backend == "cpu" else paths.build_dir().with_name(f"build-{backend}")


def build(pin: upstream.Pin | None = None, jobs: int | None = None, quiet: bool = False,
          say_up_to_date: bool = False, backend: str = "cpu") -> Fork:
    """Fetch if needed, apply the series, compile. Returns the built fork. Progress is shown
    unless quiet; that nothing needed building is said only when asked."""
    require_tools()
    pin = pin or upstream.load_pin()
    repo = upstream.ensure_vendor(pin)
    pdir = paths.patches_dir()
    st = patches.status(repo, pdir)
    if st.drifted:
        # A developer editing the fork: build what is there, never throw edits away.
        logger.warning("warning: vendor/llama.cpp has edits no patch holds; building the tree as it is "
                       "(`orchestrate patches status` for details)")
    else:
        done = patches.apply_series(repo, pdir)
        if done and not quiet:
            logger.info(f"applied {len(done)} patch(es): {', '.join(done)}")
    bdir = build_dir(backend)
    stamp = inputs_stamp(repo, pin, CMAKE_OPTIONS + BACKENDS[backend])
    stamp_path = bdir / STAMP
    fork = Fork(bdir, stamp)
    if _read_stamp(stamp_path) == stamp and all(fork.binary(t).exists() for t in TARGETS):
        if say_up_to_date:
            logger.info(f"fork is up to date ({bdir})")
        return fork

    bdir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # an interrupted build must not look finished
    log_path = bdir / LOG
    jobs = jobs or os.cpu_count() or 1
    t0 = time.monotonic()
    fresh_cache(bdir, stamp["cmake_options"])
    # the fork names itself in --version ("commit orchestrate-<tree>") without a patch to upstream code
    ident = f"-DLLAMA_BUILD_COMMIT=orchestrate-{stamp['tree'][:10]}"
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            _run(["cmake", "-S", str(repo.working_dir), "-B", str(bdir), *stamp["cmake_options"], ident,
                  *tooling(bdir)], log, "configure", None)
            write_json(bdir / CONFIGURED, stamp["cmake_options"])
            _run(["cmake", "--build", str(bdir), "--parallel", str(jobs), "--target", *TARGETS],
                 log, "build", None if quiet else Progress())
        except subprocess.CalledProcessError:
            log.flush()
            tail = read_text(log_path).splitlines()[-15:]
            logger.error("\n".join(tail))
            need = f" (the {backend} backend needs {NEEDS[backend]})" if backend in NEEDS else ""
            raise OrchestrateError(f"build of the fork failed{need}; full log: {log_path}") from None
    write_json(stamp_path, stamp)
    if not quiet:
        logger.info(f"built fork {stamp['id']} in {time.monotonic() - t0:.0f} s; log: {log_path}")
    return fork


def fresh_cache(bdir: Path, options: list[str]) -> None:
    """Configure from scratch when the options differ from those the cache was made with: CMake
    keeps cached values that other options only default (GGML_NATIVE=OFF given to a directory
    configured native leaves AVX2 off), so the same options must never depend on the directory's
    history. ccache keeps the rebuild cheap."""
    try:
        same = read_json(bdir / CONFIGURED) == options
    except (OSError, ValueError):
        same = False
    if not same:
        (bdir / "CMakeCache.txt").unlink(missing_ok=True)
        shutil.rmtree(bdir / "CMakeFiles", ignore_errors=True)


def _read_stamp(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def current(backend: str = "cpu") -> Fork:
    """The fork as last built, without building (error if there is none)."""
    bdir = build_dir(backend)
    how = "`orchestrate build`" + ("" if backend == "cpu" else f" --backend {backend}")
    stamp = _read_stamp(bdir / STAMP)
    if stamp is None:
        raise OrchestrateError(f"the fork is not built yet{'' if backend == 'cpu' else f' for {backend}'}: run {how}")
    fork = Fork(bdir, stamp)
    for t in TARGETS:
        if not fork.binary(t).exists():
            raise OrchestrateError(f"{fork.binary(t)} is missing: run {how}")
    return fork


def stock(jobs: int | None = None) -> Path:
    """llama-quantize built from the pinned upstream with none of our patches, with the fork's options,
    once (vendor/build-stock, keyed by the upstream tree and the options): the reference for "hooks
    off is stock llama.cpp". Returns its bin directory."""
    repo = upstream.ensure_vendor(upstream.load_pin())
    tree = repo.git.rev_parse(f"{upstream.UPSTREAM_TAG}^{{tree}}")
    bdir, src = paths.build_dir().with_name("build-stock"), paths.vendor_dir().with_name("stock-src")
    stamp = {"tree": tree, "cmake_options": CMAKE_OPTIONS}
    binary = bdir / "bin" / "llama-quantize"
    if _read_stamp(bdir / STAMP) == stamp and binary.exists():
        return binary.parent
    (bdir / STAMP).unlink(missing_ok=True)
    if not (src / ".tree").exists() or (src / ".tree").read_text() != tree:
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", repo.working_dir, "archive", upstream.UPSTREAM_TAG],
                                 capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(src, filter="data")
        (src / ".tree").write_text(tree)
    bdir.mkdir(parents=True, exist_ok=True)
    with open(bdir / LOG, "w", encoding="utf-8") as log:
        try:
            _run(["cmake", "-S", str(src), "-B", str(bdir), *CMAKE_OPTIONS, *tooling(bdir)], log, "configure", None)
            _run(["cmake", "--build", str(bdir), "--parallel", str(jobs or os.cpu_count() or 1), "--target",
                  "llama-quantize"], log, "build", None)
        except subprocess.CalledProcessError:
            raise OrchestrateError(f"the stock build failed; full log: {bdir / LOG}") from None
    write_json(bdir / STAMP, stamp)
    return binary.parent
