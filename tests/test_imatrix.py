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


def test_a_uniform_importance_gives_the_plain_histogram_and_per_tensor_tables_land_on_their_tensors(fork, demo_base,
                                                                                                   tmp_path):
    import gguf

    from orchestrator.fetch import sha256_of
    from orchestrator.hooks import conf
    from orchestrator.study.base import file_id, measured_histogram, weighted_histogram
    from orchestrator.tools.imatrix import Imatrix
    base_id = file_id(demo_base)
    plain = measured_histogram(fork, demo_base, base_id, 2)
    w = gguf.GGUFWriter(str(tmp_path / "flat.gguf"), "imatrix")
    for t in analysis.open_model(demo_base).tensors:
        if len(t.shape) == 2:
            w.add_tensor(f"{t.name}.in_sum2", np.full(int(t.shape[0]), 3.0, np.float32))
            w.add_tensor(f"{t.name}.counts", np.array([2.0], np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    im = Imatrix(tmp_path / "flat.gguf", sha256_of(tmp_path / "flat.gguf"), tmp_path, "x")
    assert np.allclose(weighted_histogram(fork, demo_base, base_id, im, 2), plain)  # numpy's count = the hooks'
    # per-tensor tables: a sweep keeps the model; each tensor holds its own table's levels of the stock values
    res = orchestrate("sweep", "--types", "Q8_0", "--radius", "none", "--tables", "per-tensor", "--keep-models", *SMALL,
                      "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["variants"]}
    mine = {t.name: t for t in analysis.hooked_tensors(analysis.open_model(Path(rows["q8_0-per-tensor"]["run_dir"]) / "model.gguf"))}
    stock = {t.name: t for t in analysis.hooked_tensors(analysis.open_model(Path(rows["q8_0"]["run_dir"]) / "model.gguf"))}
    echoed = json.loads((tmp_path / "out" / "hist" / "q8_0-per-tensor.json").read_text())["config"]["rules"]
    assert len(echoed) == len(mine) == len(stock)
    for rule in echoed:  # the C reader's echo of each rule's table against the Python reader's
        table = conf.load_table(Path(rule["table_file"]))
        assert rule["table"]["level"] == list(table.level)
        name = rule["pattern"]
        _, sv = analysis.decode(stock[name], analysis.blocks(stock[name]))
        _, mv = analysis.decode(mine[name], analysis.blocks(mine[name]))
        assert np.array_equal(mv, table.translate(sv)), name


def test_the_fair_fight_on_the_demo_completes_and_is_ranked(fork, demo_base, tmp_path):
    # every codebook and fit beside the stock 4-bit types with and without an importance matrix (small
    # settings: the README quotes the full run)
    tables = "basic,balanced,nf4,iq4nl,uniform,optimal,optimal-weighted,per-tensor"
    res = orchestrate("sweep", "--imatrix", "--types", "Q4_0,IQ4_NL,IQ4_XS", "--radius", "none", "--tables", tables,
                      *SMALL, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in doc["variants"]}
    stock = {f"{t}{s}" for t in ("q4_0", "iq4_nl", "iq4_xs") for s in ("", "-imat")}
    fitted = {f"q8_0-{t}{s}" for t in tables.split(",") for s in ("", "-imat")}
    assert set(rows) == {"base"} | stock | fitted and all(r["status"] == "ok" for r in rows.values())
    pr = doc["paired"]
    assert set(pr["ranking"]) == set(rows) and pr["groups"] and all(pr["vs_base"][n]["lo"] is not None for n in stock)
    assert all(4.5 < rows[n]["code_bpw"] < 4.51 for n in fitted) and all(rows[n]["code_bpw"] is None for n in stock)
    assert (tmp_path / "out" / "ppl_vs_bits.png").exists()
