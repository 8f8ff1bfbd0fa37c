"""The real thing: the pinned sdist, the real series, a real build, the built binaries."""

import json
import subprocess

from conftest import orchestrate
from orchestrator import paths
from orchestrator.fork import build


def test_built_binaries_run_and_are_the_fork(fork):
    res = subprocess.run([fork.binary("llama-perplexity"), "--version"], capture_output=True, text=True)
    assert res.returncode == 0
    out = res.stdout + res.stderr
    # the fork names itself, with the source tree it was built from
    assert f"commit orchestrate-{fork.stamp['tree'][:10]}" in out
    res = subprocess.run([fork.binary("llama-quantize"), "--help"], capture_output=True, text=True)
    assert "usage:" in res.stdout + res.stderr and "model-f32.gguf" in res.stdout + res.stderr


def test_info_lists_binaries_upstream_and_patches(fork):
    data = json.loads(orchestrate("info", "--json", check=True).stdout)
    assert data["upstream"].startswith("llama-cpp-python==0.3.36 sha256:832db069")
    series = (paths.patches_dir() / "series").read_text().split()
    assert data["patches"] == series and len(series) >= 1
    for t in build.TARGETS:
        assert data["binaries"][t].endswith(f"bin/{t}")
    text = orchestrate("info", check=True).stdout
    assert "upstream" in text and series[0] in text


def test_second_build_does_no_compile_work(fork):
    log = fork.build_dir / build.LOG
    before = log.stat().st_mtime_ns
    res = orchestrate("build", check=True)
    assert "up to date" in res.stderr
    assert log.stat().st_mtime_ns == before  # neither cmake step ran
    # and the build system agrees there was nothing left to do
    tool = ["ninja", "-C", str(fork.build_dir), "-n"] if (fork.build_dir / "build.ninja").exists() else \
        ["make", "-C", str(fork.build_dir), "-q"]
    res = subprocess.run(tool + build.TARGETS, capture_output=True, text=True)
    if tool[0] == "ninja":
        assert "no work to do" in res.stdout
    else:
        assert res.returncode == 0


def test_patch_series_applies_to_pinned_upstream(fork):
    res = orchestrate("patches", "check", check=True)
    assert "apply to llama-cpp-python==0.3.36" in res.stdout
    st = orchestrate("patches", "status", check=True).stdout
    assert "not applied" not in st and "drifted" not in st


def test_the_portable_build_is_vectorised(fork):
    """GGML_NATIVE=OFF must still give the x86-64-v3 kernels, whatever the directory was before."""
    import platform
    cache = (fork.build_dir / "CMakeCache.txt").read_text()
    assert "GGML_NATIVE:BOOL=OFF" in cache
    if platform.machine() in ("x86_64", "AMD64"):
        for opt in ("GGML_AVX2", "GGML_FMA", "GGML_F16C"):
            assert f"{opt}:BOOL=ON" in cache, opt


def test_changed_options_configure_from_scratch(tmp_path):
    """CMake keeps cached defaults: a cache made with other options is thrown away, never reused."""
    (tmp_path / "CMakeFiles").mkdir()
    (tmp_path / "CMakeCache.txt").write_text("GGML_AVX2:BOOL=OFF\n")
    (tmp_path / build.CONFIGURED).write_text('["-DGGML_NATIVE=OFF"]')
    build.fresh_cache(tmp_path, ["-DGGML_NATIVE=OFF"])
    assert (tmp_path / "CMakeCache.txt").exists()  # same options: an incremental build
    build.fresh_cache(tmp_path, ["-DGGML_NATIVE=OFF", "-DGGML_BLAS=ON"])
    assert not (tmp_path / "CMakeCache.txt").exists() and not (tmp_path / "CMakeFiles").exists()
