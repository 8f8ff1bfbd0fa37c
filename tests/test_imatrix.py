"""Importance matrices on the real fork: made once per content and reused, what the hooks do to an
importance-weighted Q4_0, and a type that needs one swept with it where it is refused without."""

import json
from pathlib import Path

import numpy as np

from conftest import orchestrate
from orchestrator.study import analysis

SMALL = ["--ctx", "128", "--chunks", "8", "--threads", "2"]


def decoded(path):
    return {t.name: analysis.decode(t, analysis.blocks(t)) for t in analysis.hooked_tensors(analysis.open_model(path))
            if t.tensor_type == analysis.Q4_0}


def test_an_importance_matrix_is_made_once_and_reused(fork, demo_base, tmp_path):
    first = orchestrate("imatrix", *SMALL)
    assert first.returncode == 0, first.stderr[-2000:]
    path = Path(first.stdout.strip().splitlines()[-1])
    made = path.stat().st_mtime_ns
    again = orchestrate("imatrix", *SMALL)
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == path
    assert path.stat().st_mtime_ns == made and "importance matrix of" not in again.stderr  # not made again
    assert path.name.endswith(".gguf") and analysis.open_model(path).get_field("general.type") is not None


def test_the_radius_acts_on_the_importance_weighted_q4_0(fork, demo_base, tmp_path):
    # with an importance matrix llama-quantize searches each block's scale with the weights; the hooks
    # then zero the small values of what it chose: the hooked file is the weighted stock file with the
    # radius applied, every scale kept
    im = Path(orchestrate("imatrix", *SMALL, check=True).stdout.strip().splitlines()[-1])
    for name, args in (("stock", []), ("r1", ["--radius", "1"]), ("plain", [])):
        extra = [] if name == "plain" else ["--", "--imatrix", im]
        res = orchestrate("quantize", demo_base, tmp_path / f"{name}.gguf", "Q4_0", *args, "--threads", "2", *extra)
        assert res.returncode == 0, res.stderr[-2000:]
    stock, hooked, plain = decoded(tmp_path / "stock.gguf"), decoded(tmp_path / "r1.gguf"), decoded(tmp_path / "plain.gguf")
    assert any(not np.array_equal(stock[n][1], plain[n][1]) for n in stock)  # the weights did change the values
    for n, (scales, values) in stock.items():
        hs, hv = hooked[n]
        assert np.array_equal(scales.view(np.uint16), hs.view(np.uint16)), n
        assert np.array_equal(hv, np.where(np.abs(values) <= 1, 0, values)), n


def test_a_type_that_needs_an_importance_matrix_sweeps_with_one(fork, demo_base, tmp_path):
    refused = orchestrate("sweep", "--types", "IQ2_XS", "--radius", "none", "--tables", "none", *SMALL,
                          "--out", tmp_path / "no")
    assert refused.returncode == 1 and "IQ2_XS needs an importance matrix" in refused.stderr and "--imatrix" in refused.stderr
    res = orchestrate("sweep", "--types", "IQ2_XS,Q4_0", "--radius", "none", "--tables", "none", "--imatrix", *SMALL,
                      "--out", tmp_path / "yes")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "yes" / "results.json").read_text())
    rows = {r["name"]: r for r in doc["variants"]}
    assert set(rows) == {"base", "iq2_xs-imat", "q4_0", "q4_0-imat"} and all(r["status"] == "ok" for r in rows.values())
    assert any("--imatrix" in c for c in rows["q4_0-imat"]["commands"][0])
    assert rows["q4_0"]["tensor_key"] != rows["q4_0-imat"]["tensor_key"]
    fitted = doc["texts"]["fit"][0]
    assert fitted["for"].startswith("Fitted the importance matrix") and fitted["end"] == doc["texts"]["score"]["start"]
