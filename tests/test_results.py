"""The result row: a typed record that round-trips through its dictionary form, reads the landed
format (rows without a version), refuses what a newer version wrote, and names results.csv's columns."""

import dataclasses

import pytest

from orchestrator.errors import OrchestrateError
from orchestrator.results import CSV_COLUMNS, ROW_VERSION, Row

# a row as the landed code wrote it into result.json (no version field)
LANDED = {"name": "q4_0-r1", "kind": "radius", "type": "Q4_0", "main_type": "Q4_0", "tensor_types": {"Q4_0": 10},
          "mode": "pablo", "radius": 1, "table": None, "status": "ok", "ppl": 40.5, "ppl_err": 1.5,
          "ppl_chunks": [41.0, 40.5], "scored_for": "q4_0-r1", "kld": None, "kld_err": None, "same_top": None,
          "same_top_err": None, "rms_dp": None, "rms_dp_err": None, "file_bytes": 123, "bpw": 4.5, "elements": 10,
          "zero_fraction": 0.3, "isolated_zero_share": 0.6, "entropy_bpw": 3.1, "rle_bpw": 3.9, "zstd_bpw": 4.2,
          "zstd_sampled": 1.0, "weight_rel_rmse": 0.1, "quantize_seconds": 1.0, "perplexity_seconds": 2.0,
          "analysis_seconds": 0.5, "commands": [["q"], ["p"]], "run_dir": "/c/runs/x", "tensor_key": "abc",
          "score_dir": "/c/scores/y", "scores_file": "/c/scores/y/scores.bin"}


def test_a_landed_row_reads_and_round_trips():
    row = Row.from_dict(LANDED)
    assert row.ppl == 40.5 and row.tensor_types == {"Q4_0": 10} and row.hist is None
    d = row.to_dict()
    assert d["row_version"] == ROW_VERSION and {k: d[k] for k in LANDED} == LANDED
    assert Row.from_dict(d) == row


def test_a_row_never_changes_but_gives_a_new_one():
    row = Row.from_dict(LANDED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.ppl = 1.0
    other = row.but(table_file="t.table")
    assert other.table_file == "t.table" and row.table_file is None and other.ppl == row.ppl


@pytest.mark.parametrize("d", [{**LANDED, "row_version": ROW_VERSION + 1}, {**LANDED, "new_field": 1}])
def test_a_newer_row_is_refused_in_one_line(d):
    with pytest.raises(OrchestrateError, match="newer orchestrate"):
        Row.from_dict(d)


def test_csv_columns_are_the_documented_ones_in_order():
    assert CSV_COLUMNS[:9] == ["name", "kind", "type", "mode", "radius", "table", "status", "ppl", "ppl_err"]
    assert CSV_COLUMNS[-4:] == ["tensor_key", "reason", "log", "run_dir"] and len(CSV_COLUMNS) == 38
    assert not {"commands", "ppl_chunks", "ran_on", "hist", "damage"} & set(CSV_COLUMNS)


def _doc(tmp_path, **changes):
    import json
    from orchestrator.results import FILE, SCHEMA
    doc = {"schema": SCHEMA, "description": "d", "perplexity": {"ctx": 128}, "fork": {"id": "f"},
           "variants": [{**LANDED, "name": "base", "kind": "base", "radius": None}, dict(LANDED)], **changes}
    tmp_path.mkdir()
    (tmp_path / FILE).write_text(json.dumps(doc))
    return tmp_path


def _row(**changes):
    return [{**LANDED, "name": "base", "kind": "base"}, {**LANDED, **changes}]


@pytest.mark.parametrize("changes, says", [
    ({"variants": {"base": 1}}, "`variants` is not a list"),
    ({"paired": [1, 2]}, "`paired` is not an object"),
    ({"tails": "x"}, "`tails` is not an object"),
    ({"fork": "f"}, "`fork` is missing or not an object"),
    ({"description": 3}, "`description` is not a string"),
    ({"variants": _row(name=None)}, "variant 2 has no name, kind or status"),
    ({"variants": _row(ppl="40.5")}, "variant q4_0-r1: `ppl` is str"),
    ({"variants": _row(ppl=True)}, "variant q4_0-r1: `ppl` is bool"),
    ({"variants": _row(radius=1.5)}, "variant q4_0-r1: `radius` is float"),
    ({"variants": _row(tensor_types=[1])}, "variant q4_0-r1: `tensor_types` is list"),
])
def test_a_damaged_results_document_is_refused_in_one_line(tmp_path, changes, says):
    from conftest import orchestrate
    from orchestrator import results
    good = results.load(_doc(tmp_path / "good"))
    assert good["variants"][1]["ppl"] == 40.5  # (an int where a float is due is a float: radius 1, bytes)
    bad = _doc(tmp_path / "bad", **changes)
    before = (bad / results.FILE).read_bytes()
    with pytest.raises(OrchestrateError, match="damaged") as e:
        results.load(bad)
    assert says in str(e.value) and "\n" not in str(e.value)
    for args in (["plot", bad], ["compare", bad, "base", "q4_0-r1"]):
        res = orchestrate(*args)
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and says in res.stderr, res.stderr
    assert (bad / results.FILE).read_bytes() == before
