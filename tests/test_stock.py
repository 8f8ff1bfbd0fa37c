"""Hooks off is stock llama.cpp: the fork's llama-quantize, with no configuration and with the hooks
only counting (MODE = simple with histograms), writes the same bytes as llama-quantize built from the
same upstream with none of our patches (the series touches ggml.c and llama-quant.cpp), for every
type the tests use."""

import subprocess

import pytest

from orchestrator.fork import build
from orchestrator.tools.quantize import run_quantize

TYPES = ["Q4_0", "Q8_0", "Q4_1", "Q4_K_M", "Q5_K_S", "Q6_K", "IQ4_NL", "BF16", "F16"]


@pytest.fixture(scope="session")
def stock_bin(fork):
    return build.stock()


def test_the_stock_build_has_none_of_our_code(stock_bin, fork):
    assert stock_bin != fork.build_dir / "bin"
    ours = [p.name for p in stock_bin.parent.rglob("*pablo*")]
    assert ours == [] and b"PABLO_CONF" not in (stock_bin / "libggml-base.so").read_bytes()
    assert b"PABLO_CONF" in (fork.build_dir / "bin" / "libggml-base.so").read_bytes()  # the check can fail


@pytest.mark.parametrize("qtype", TYPES)
def test_hooks_off_quantize_is_byte_identical_to_stock(stock_bin, fork, demo_base, tmp_path, qtype):
    ref = tmp_path / "stock.gguf"
    res = subprocess.run([str(stock_bin / "llama-quantize"), str(demo_base), str(ref), qtype, "2"],
                         capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(stock_bin)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    off = run_quantize(fork, demo_base, tmp_path / "off.gguf", qtype, threads=2, progress=False)
    run_quantize(fork, demo_base, tmp_path / "counted.gguf", qtype, threads=2, progress=False, hist=tmp_path / "hist.json")
    assert off["seconds"] > 0 and (tmp_path / "hist.json").stat().st_size > 0  # the hooks did run in `counted`
    assert (tmp_path / "off.gguf").read_bytes() == ref.read_bytes(), qtype
    assert (tmp_path / "counted.gguf").read_bytes() == ref.read_bytes(), qtype
