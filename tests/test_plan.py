"""`sweep --plan` and the disk check of a real sweep."""

import json
import re
import subprocess

import pytest

from conftest import need_root, orchestrate
from orchestrator.paths import fresh_cache

TINY = ["--radius", "none", "--tables", "none", "--types", "Q8_0", "--chunks", "2", "--ctx", "128", "--threads", "2"]


def mb(text: str, label: str) -> float:
    m = re.search(label + r" ([\d.]+) (kB|MB|GB)", text)
    assert m, text
    return float(m.group(1)) * {"kB": 1e-3, "MB": 1, "GB": 1e3}[m.group(2)]


def test_plan_runs_nothing_and_its_estimates_hold(fork, demo_base, tmp_path):
    cache = fresh_cache(tmp_path / "cache")
    env = {"ORCHESTRATE_CACHE": str(cache)}
    plan = orchestrate("sweep", *TINY, "--keep-models", "--plan", "--out", tmp_path / "out", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "2 variants, 2 to run" in plan.stdout and "one-chunk calibration" in plan.stdout
    assert re.search(r"q8_0\s+to run\s+quantize \?, perplexity ~\d+m\d\ds", plan.stdout), plan.stdout
    assert "fits" in plan.stdout
    assert not (tmp_path / "out").exists() and not (cache / "runs").exists() and not (cache / "scores").exists()
    estimate = mb(plan.stdout, "quantized models")
    run = orchestrate("sweep", *TINY, "--keep-models", "--out", tmp_path / "out", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    model = next((cache / "runs").glob("q8_0-*/model.gguf"))
    actual = model.stat().st_size / 1e6
    assert actual <= estimate <= 1.3 * actual, (estimate, actual)
    again = orchestrate("sweep", *TINY, "--plan", "--out", tmp_path / "out", env=env)
    assert again.returncode == 0 and "2 variants, 0 to run" in again.stdout and again.stdout.count("cached") == 2
    assert "perplexity timed from 2 earlier runs here on models of about this size, quantize from 1 earlier runs" \
        in again.stdout
    more = orchestrate("sweep", *TINY, "--types", "Q8_0,Q4_0", "--plan", "--out", tmp_path / "out", env=env)
    assert more.returncode == 0 and re.search(r"q4_0\s+to run\s+quantize ~", more.stdout) and re.search(r"q8_0\s+cached", more.stdout)


def test_a_plan_with_an_importance_matrix_counts_it_and_the_twins(fork, demo_base, tmp_path):
    cache = fresh_cache(tmp_path / "cache")
    env = {"ORCHESTRATE_CACHE": str(cache)}
    args = ["sweep", *TINY, "--types", "Q8_0,Q4_0", "--imatrix", "--out", tmp_path / "out"]
    plan = orchestrate(*args, "--plan", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "5 variants, 5 to run" in plan.stdout, plan.stdout
    assert re.search(r"\(importance matrix\)\s+to make\s+perplexity ~", plan.stdout), plan.stdout
    for name in ("q8_0-imat", "q4_0-imat"):
        assert re.search(name + r"\s+to run\s+quantize", plan.stdout), plan.stdout
    assert not (cache / "imatrix").exists() or not list((cache / "imatrix").glob("*.gguf"))
    run = orchestrate(*args, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ran = {r["name"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["variants"]}
    assert ran == {"base", "q8_0", "q8_0-imat", "q4_0", "q4_0-imat"}
    again = orchestrate(*args, "--plan", env=env)
    assert again.returncode == 0 and "5 variants, 0 to run" in again.stdout, again.stdout
    assert re.search(r"\(importance matrix\)\s+cached", again.stdout), again.stdout


def test_a_plan_with_tasks_times_the_answering_from_earlier_answers(fork, demo_base, tmp_path):
    cache = fresh_cache(tmp_path / "cache")
    env = {"ORCHESTRATE_CACHE": str(cache)}
    orchestrate("task", "make", "--out", "cloze.hs", "--format", "hellaswag", "--questions", "30", cwd=tmp_path,
                check=True)
    args = ["sweep", *TINY, "--task", "hellaswag:cloze.hs", "--out", "out"]
    first = orchestrate(*args, "--plan", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert re.search(r"q8_0\s+to run\s+quantize \?, perplexity ~\S+, answers \?", first.stdout), first.stdout
    assert "(plus steps with no estimate: ?)" in first.stdout
    run = orchestrate(*args, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    took = sorted(json.loads(a.read_text())["seconds"] for a in (cache / "scores").glob("*/answers-*.json"))
    assert len(took) == 2  # the base's and Q8_0's
    more = orchestrate("sweep", *TINY, "--types", "Q8_0,Q4_0", "--task", "hellaswag:cloze.hs", "--out", "out",
                       "--plan", env=env, cwd=tmp_path)
    m = re.search(r"q4_0\s+to run\s+quantize ~\S+, perplexity ~\S+, answers ~(\d+)m(\d\d)s", more.stdout)
    assert m, more.stdout
    assert re.search(r"q8_0\s+cached", more.stdout) and "no estimate" not in more.stdout, more.stdout
    # the models have one size: the estimate is the median of the two answering times
    assert abs(60 * int(m.group(1)) + int(m.group(2)) - sum(took) / 2) <= 0.5 + 1e-9, (m.group(0), took)


def test_perplexity_rates_come_from_models_of_about_the_same_size():
    from orchestrator.study.plan import History, estimate
    small, big = 135e6, 6.7e9
    hist = History({}, {}, {"F16": [(small, 0.010), (big, 0.040)], "Q4_0": [(small, 0.020), (big, 0.030)]})
    tokens = 1000
    assert estimate("Q4_0", 1.0, tokens, 7e9, hist, None)[1] == pytest.approx(0.030 * tokens * 7)
    assert estimate(None, 1.0, tokens, 100e6, hist, None)[1] == pytest.approx(0.010 * tokens * 0.1)
    # a 70B model: no run near its size; the base's calibration, scaled by the type's ratio to F16
    ratio = 0.025 / 0.025  # medians over all sizes: Q4_0 (0.020, 0.030), F16 (0.010, 0.040)
    assert estimate("Q4_0", 1.0, tokens, 70e9, hist, 0.05)[1] == pytest.approx(0.05 * ratio * tokens * 70)
    only_small = History({}, {}, {"F16": [(small, 0.010)], "Q4_0": [(small, 0.020)]})
    assert estimate("Q4_0", 1.0, tokens, 7e9, only_small, 0.04)[1] == pytest.approx(0.04 * 2 * tokens * 7)


def test_a_sweep_that_will_not_fit_refuses_to_start(fork, demo_base, tmp_path):
    need_root("mounting a small tmpfs as the cache's disk")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "none", str(small)], check=True)
    try:
        cache = fresh_cache(small / "cache")
        env = {"ORCHESTRATE_CACHE": str(cache)}
        plan = orchestrate("sweep", *TINY, "--plan", "--out", tmp_path / "out", env=env)
        assert "DOES NOT FIT" in plan.stdout, plan.stdout
        res = orchestrate("sweep", *TINY, "--out", tmp_path / "out", env=env)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert re.search(r"error: the sweep needs about [\d.]+ MB under .* only [\d.]+ MB is free", res.stderr)
        assert "--force" in res.stderr and not (tmp_path / "out").exists() and not (cache / "runs").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)
