import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orchestrator import paths

REPO = Path(__file__).resolve().parent.parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


# .ci/run sets this: there every optional part is installed, so a test that would skip for want of
# one fails instead (nothing is silently skipped in CI).
REQUIRE_OPTIONAL = "ORCHESTRATE_REQUIRE_OPTIONAL"


def optional(part: str, missing: str | None, install: str) -> None:
    """Skip (or, under REQUIRE_OPTIONAL, fail) a test that needs an optional part which is missing:
    missing says what is absent (None: present), install how to get it."""
    if missing is None:
        return
    message = f"{part}: {missing} (install: {install})"
    if os.environ.get(REQUIRE_OPTIONAL) == "1":
        pytest.fail(f"{message}; {REQUIRE_OPTIONAL}=1 makes this a failure")
    pytest.skip(message)


def openblas_missing() -> str | None:
    """Why a BLAS build of the fork cannot be made here (None when OpenBLAS's library and headers are present)."""
    if ctypes.util.find_library("openblas") is None:
        return "the OpenBLAS library is not installed"
    if not glob.glob("/usr/include/**/cblas.h", recursive=True) + glob.glob("/usr/local/include/**/cblas.h",
                                                                            recursive=True):
        return "OpenBLAS's headers (cblas.h) are not installed"
    return None


def need_openblas() -> None:
    optional("the BLAS backend", openblas_missing(), "apt-get install libopenblas-dev")


def need_ray() -> None:
    try:
        import ray  # noqa: F401
        missing = None
    except ImportError:
        missing = "Ray is not installed"
    optional("the Ray executor", missing, "pip install -e '.[ray]'")


def need_root(why: str) -> None:
    optional(why, None if os.geteuid() == 0 else "not running as root", "run the tests as root (CI does)")


def need_tool(name: str, package: str) -> None:
    optional(name, None if shutil.which(name) else f"{name} is not on PATH", f"apt-get install {package}")


# What the test session shares with the user's cache: facts about files that no Python change alters
# (downloads, the demo files and their upcast base, hashes and header types, what the fork's tools
# say). Not the base's scan, which our own analysis code computes.
TEST_FACTS = tuple(f for f in paths.CACHE_FACTS if f != "model-scans")


def pytest_configure(config):
    """The whole session runs in a run cache of its own: no test reads a result that an earlier
    version of the code left in the user's cache."""
    user = paths.cache_dir()
    for sub in TEST_FACTS:  # made now, so that what the session learns is kept for the next one
        if not sub.endswith(".json"):
            (user / sub).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="orchestrate-tests-"))
    config._orchestrate_cache = root
    os.environ["ORCHESTRATE_CACHE"] = str(paths.fresh_cache(root / "cache", TEST_FACTS))


def pytest_unconfigure(config):
    root = getattr(config, "_orchestrate_cache", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


def orchestrate(*args, env=None, cwd=None, check=False):
    """Run the real CLI in a subprocess (as a user would)."""
    res = subprocess.run([sys.executable, "-m", "orchestrator", *map(str, args)], capture_output=True,
                         encoding="utf-8", errors="surrogateescape",  # a path's bytes, printed as they are
                         env={**os.environ, **(env or {})}, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"orchestrate {args} failed:\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A project whose upstream is a small local git repository (fast tests of the series)."""
    up = tmp_path / "upstream"
    up.mkdir()
    git(up, "init", "-q")
    (up / "a.c").write_text("".join(f"int a{i} = {i};\n" for i in range(20)))
    (up / "b.c").write_text("".join(f"int b{i} = {i};\n" for i in range(20)))
    git(up, "add", "-A")
    git(up, "commit", "-qm", "v1")
    v1 = git(up, "rev-parse", "HEAD")
    # a later upstream version that rewrites b.c (so a patch to b.c no longer applies)
    (up / "b.c").write_text("".join(f"long b{i} = {i * 10};\n" for i in range(20)))
    git(up, "commit", "-qam", "v2")
    v2 = git(up, "rev-parse", "HEAD")

    proj = tmp_path / "proj"
    (proj / "conf").mkdir(parents=True)
    (proj / "patches").mkdir()
    (proj / "patches" / "series").write_text("")
    (proj / "conf" / "upstream.yaml").write_text(f"source: git\ngit:\n  url: {up}\n  commit: {v1}\n")
    monkeypatch.setenv("ORCHESTRATE_HOME", str(proj))
    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    return {"proj": proj, "upstream": up, "v1": v1, "v2": v2, "vendor": proj / "vendor" / "llama.cpp"}


@pytest.fixture(scope="session")
def fork():
    """The real patched fork, built by `orchestrate build` (cached by its stamp and ccache)."""
    from orchestrator.fork import build
    res = orchestrate("build")
    assert res.returncode == 0, res.stdout + res.stderr
    return build.current()


@pytest.fixture(scope="session")
def demo_base(fork):
    """The demo model's F16 base (an upcast of its Q4_1 weights), made once and cached."""
    from orchestrator import demo
    from orchestrator.study.base import prepare_base
    base = prepare_base(demo.demo_model(), fork)
    assert base.upcast_from == "Q4_1"
    return base.path


@pytest.fixture(scope="session")
def demo_text():
    from orchestrator import demo
    return demo.demo_text()


@pytest.fixture(scope="session")
def q(fork, demo_base, tmp_path_factory):
    """quantize(name, TYPE, ...) -> (model, histogram json or None), each made once a session."""
    d = tmp_path_factory.mktemp("quant")
    made = {}

    def run(name, qtype, hist=True, **kw):
        key = (qtype, hist, repr(sorted(kw.items())))  # everything that makes the model, not just its name
        if key not in made:
            stem = f"{name}-{len(made)}"
            out, h = d / f"{stem}.gguf", (d / f"{stem}.json" if hist else None)
            from orchestrator.tools.quantize import run_quantize
            run_quantize(fork, demo_base, out, qtype, hist=h, progress=False, **kw)
            made[key] = (out, h)
        return made[key]
    return run


