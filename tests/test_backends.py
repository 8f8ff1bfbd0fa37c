"""Backends for llama-perplexity: the BLAS build (the one testable here, without a GPU) beside the
CPU build, and the GPU-layers plumbing."""

import json
import sys
from pathlib import Path

import pytest

from conftest import need_openblas, orchestrate
from orchestrator.fork import build

SMALL = ["--radius", "1", "--types", "Q4_0,Q8_0", "--tables", "none", "--chunks", "4", "--threads", "2"]


@pytest.fixture(scope="module")
def blas(fork):
    need_openblas()
    res = orchestrate("build", "--backend", "blas")
    assert res.returncode == 0, res.stderr[-3000:]
    return build.current("blas")


def rows(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}


def test_blas_is_built_beside_the_cpu_fork(fork, blas):
    assert blas.build_dir != fork.build_dir and blas.build_dir.name == "build-blas"
    assert blas.id != fork.id and blas.backend == "blas" and fork.backend == "cpu" and not blas.gpu
    assert "-DGGML_BLAS=ON" in blas.stamp["cmake_options"]
    assert (blas.build_dir / "bin" / "libggml-blas.so").exists() and not (fork.build_dir / "bin" / "libggml-blas.so").exists()
    assert build.current().id == fork.id  # the CPU build is untouched


def test_blas_perplexities_agree_with_the_cpu_build(fork, blas, demo_base, tmp_path):
    on_cpu = orchestrate("sweep", *SMALL, "--out", tmp_path / "cpu")
    on_blas = orchestrate("sweep", *SMALL, "--backend", "blas", "--out", tmp_path / "blas")
    assert on_cpu.returncode == 0 and on_blas.returncode == 0, on_blas.stderr[-3000:]
    cpu, bl = rows(tmp_path / "cpu"), rows(tmp_path / "blas")
    # BLAS really computed: its matrix products add in another order, so some perplexity differs from
    # the CPU build's in its last digits (the same code would give the same bits) ...
    assert any(r["ppl"] != cpu[name]["ppl"] for name, r in bl.items())
    for name, r in bl.items():
        c = cpu[name]
        assert r["tensor_key"] == c["tensor_key"], name  # quantization (and the hooks) run on the CPU path
        # ... and only there: measured up to 0.06 of a standard error on the demo
        assert abs(r["ppl"] - c["ppl"]) < 0.25 * c["ppl_err"], (name, r["ppl"], c["ppl"], c["ppl_err"])
        assert r["run_dir"] != c["run_dir"] and r["score_dir"] != c["score_dir"]  # its own runs (its fork id)
        assert Path(r["commands"][-1][0]).parent.parent.name == "build-blas"
    assert json.loads((tmp_path / "blas" / "results.json").read_text())["fork"]["id"] == blas.id


def test_gpu_layers_reach_llama_perplexity_and_the_run_key(fork, demo_base, tmp_path):
    plain = orchestrate("sweep", "--radius", "none", "--types", "none", "--tables", "none", "--chunks", "2",
                        "--ctx", "128", "--out", tmp_path / "a")
    layers = orchestrate("sweep", "--radius", "none", "--types", "none", "--tables", "none", "--chunks", "2",
                         "--ctx", "128", "--gpu-layers", "0", "--out", tmp_path / "b")
    assert plain.returncode == 0 and layers.returncode == 0, layers.stderr[-3000:]
    a, b = rows(tmp_path / "a")["base"], rows(tmp_path / "b")["base"]
    assert "-ngl" not in a["commands"][-1] and b["commands"][-1][-2:] == ["-ngl", "0"]
    # llama-perplexity read it: a build without a GPU says it will ignore the option, and only then
    said = [(Path(r["score_dir"]) / "perplexity.log").read_text() for r in (a, b)]
    assert "--gpu-layers option will be ignored" in said[1] and "--gpu-layers" not in said[0]
    assert a["run_dir"] != b["run_dir"] and a["ppl"] == b["ppl"]  # no GPU here: the same numbers


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal builds on macOS")
def test_a_backend_that_cannot_build_says_what_it_needs(fork):
    res = orchestrate("build", "--backend", "metal")  # CMake stops at once off macOS
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: build of the fork failed (the metal backend needs macOS") and "full log:" in last
    assert build.current().id == fork.id
