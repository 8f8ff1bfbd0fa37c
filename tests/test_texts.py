"""Fitting and scoring texts (orchestrator.texts): the split, the overlap check and the report's warning,
and a real sweep scoring only the second part of a split text."""

import json
from pathlib import Path

import pytest

from conftest import orchestrate
from orchestrator import texts
from orchestrator.errors import OrchestrateError
from orchestrator.fetch import sha256_of
from orchestrator.report.report import render_texts


def test_split_cuts_at_a_line_break_and_keeps_both_parts(tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(b"aaaa\nbbbb\ncccc\ndddd\n")
    fit, score = texts.split(src, 0.3, tmp_path / "cache")
    assert fit.path.read_bytes() == b"aaaa\nbbbb\n" and score.path.read_bytes() == b"cccc\ndddd\n"
    assert (fit.start, fit.end, score.start, score.end) == (0, 10, 10, 20)
    assert fit.sha256 == sha256_of(fit.path) and score.source_sha256 == sha256_of(src)
    assert texts.split(src, 0.3, tmp_path / "cache") == (fit, score)  # the same parts again
    for bad in (0, 1, 1.5):
        with pytest.raises(OrchestrateError, match="between 0 and 1"):
            texts.split(src, bad, tmp_path / "cache")
    (tmp_path / "one.txt").write_bytes(b"no line break at all")
    assert texts.split(tmp_path / "one.txt", 0.5, tmp_path / "cache")[1].path.read_bytes() == b"eak at all"


def test_overlaps():
    src = texts.record(Path("t"), "S")
    part = lambda a, b, sha: {"file": "p", "sha256": sha, "source_sha256": "S", "start": a, "end": b}  # noqa: E731
    assert texts.overlaps(src, src)
    assert texts.overlaps(part(0, 10, "A"), src) and texts.overlaps(src, part(0, 10, "A"))  # a part of it
    assert not texts.overlaps(part(0, 10, "A"), part(10, 20, "B"))                           # two halves
    assert texts.overlaps(part(0, 11, "A"), part(10, 20, "B"))
    assert not texts.overlaps(src, texts.record(Path("u"), "U"))


def test_the_report_warns_when_the_fitting_text_is_scored():
    score = texts.record(Path("t"), "S")
    doc = {"texts": {"score": score, "fit": [{"for": "Fitted an importance matrix", **score}], "tasks": []}}
    assert any("Warning" in line for line in render_texts(doc))
    doc["texts"]["fit"] = [{"for": "Fitted an importance matrix", **texts.record(Path("u"), "U")}]
    assert not any("Warning" in line for line in render_texts(doc))


def test_a_split_sweep_scores_only_the_rest(fork, demo_base, demo_text, tmp_path):
    res = orchestrate("sweep", "--radius", "none", "--tables", "none", "--types", "none", "--chunks", "8", "--ctx",
                      "128", "--threads", "2", "--split-text", "0.5", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-2000:]
    t = json.loads((tmp_path / "out" / "results.json").read_text())["texts"]
    data = demo_text.read_bytes()
    assert Path(t["score"]["file"]).read_bytes() == data[t["score"]["start"]:]
    assert t["fit"][0]["end"] == t["score"]["start"] > len(data) // 2 - 1
    assert "Held back for fitting" in (tmp_path / "out" / "report.md").read_text()
