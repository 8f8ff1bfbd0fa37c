"""`orchestrate cache list|gc` on a run cache that real sweeps filled."""

import json
import re
from pathlib import Path

import filelock
import pytest

from conftest import orchestrate
from orchestrator.paths import fresh_cache
from orchestrator.errors import OrchestrateError
from orchestrator.study import cache

TINY = ["--tables", "none", "--chunks", "2", "--ctx", "128", "--threads", "2"]


@pytest.fixture
def two_sweeps(fork, demo_base, tmp_path):
    """A fresh run cache used by an older sweep (radius 1) and a newer one (radius 2); both have
    the base and stock Q4_0, which they share."""
    root = fresh_cache(tmp_path / "cache")
    env = {"ORCHESTRATE_CACHE": str(root)}
    old, new = tmp_path / "old", tmp_path / "new"
    for out, radius in ((old, "1"), (new, "2")):
        res = orchestrate("sweep", "--radius", radius, "--types", "Q4_0", *TINY, "--out", out, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    return root, env, old, new


def rows(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}


def test_list_shows_each_sweep_with_its_variants_and_sizes(two_sweeps):
    root, env, old, new = two_sweeps
    res = orchestrate("cache", "list", env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if not line.startswith("  ") and not line.startswith("total")]
    assert [lines[i].split(":")[0] for i in heads] == [str(new), str(old)]  # most recently used first
    newer = lines[heads[0] + 1:heads[1]]
    assert {(line.split()[0], line.split()[1]) for line in newer} == {
        ("run", "base"), ("score", "base"), ("run", "q4_0"), ("score", "q4_0"), ("run", "q4_0-r2"), ("score", "q4_0-r2")}
    run = Path(rows(new)["q4_0-r2"]["run_dir"])
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    line = next(line for line in newer if run.name in line)
    assert cache.human(size) in line
    assert re.search(r"total: 8 directories", res.stdout)  # base and q4_0 are shared by the two sweeps


def test_gc_keeps_the_last_sweeps_and_what_a_live_sweep_holds(two_sweeps):
    root, env, old, new = two_sweeps
    r1 = rows(old)["q4_0-r1"]
    dry = orchestrate("cache", "gc", "--keep-last", "1", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would remove") == 2 and Path(r1["run_dir"]).exists()  # q4_0-r1's run and score
    assert r1["run_dir"] in dry.stdout and r1["score_dir"] in dry.stdout
    with filelock.FileLock(str(Path(r1["score_dir"]) / ".lock")):  # a live sweep at work on it
        gc = orchestrate("cache", "gc", "--keep-last", "1", env=env)
    assert gc.returncode == 0, gc.stderr
    assert "removed run q4_0-r1" in gc.stdout and "kept score q4_0-r1: a live sweep holds it" in gc.stdout
    assert not Path(r1["run_dir"]).exists() and Path(r1["score_dir"]).exists()
    # the newer sweep is untouched: fully cached
    again = orchestrate("sweep", "--radius", "2", "--types", "Q4_0", *TINY, "--out", new, env=env)
    assert again.returncode == 0 and again.stderr.count("(cached)") == 3, again.stderr
    # the older one lost radius 1's run: it is quantized again (its score was kept: not scored again)
    back = orchestrate("sweep", "--radius", "1", "--types", "Q4_0", *TINY, "--out", old, env=env)
    assert back.returncode == 0 and "q4_0-r1: quantize" in back.stderr and "q4_0-r1: perplexity" not in back.stderr
    fresh = orchestrate("cache", "gc", "--older-than", "1h", env=env)
    assert fresh.returncode == 0 and "freed 0 B in 0 directories" in fresh.stdout


def test_age_and_keep_rules():
    now = 1_000_000.0
    e = lambda name, age, sweeps: cache.Entry(Path(name), "run", name, 1, now - age,  # noqa: E731
                                              {s: now - age for s in sweeps})
    items = [e("a", 10 * 86400, ["s1"]), e("b", 3600, ["s2"]), e("c", 20 * 86400, ["s2"]), e("d", 5, [])]
    names = lambda xs: sorted(x.name for x in xs)  # noqa: E731
    assert names(cache.doomed(items, cache.parse_age("7d"), None, now)) == ["a", "c"]
    assert names(cache.doomed(items, None, 1, now)) == ["a", "d"]          # s2 is the last sweep used
    assert names(cache.doomed(items, cache.parse_age("7d"), 1, now)) == ["a"]
    assert names(cache.doomed(items, None, 2, now)) == ["d"]
    assert cache.parse_age("2w") == 14 * 86400 and cache.parse_age("45m") == 2700
    for bad in ("", "3x", "d", "-1d"):
        with pytest.raises(OrchestrateError):
            cache.parse_age(bad)
    with pytest.raises(OrchestrateError, match="say what to remove"):
        cache.doomed(items, None, None, now)


def test_gc_bad_input_is_one_line(tmp_path):
    env = {"ORCHESTRATE_CACHE": str(tmp_path)}
    for args, words in ((["gc"], "say what to remove"), (["gc", "--older-than", "3x"], "expected a number"),
                        (["gc", "--keep-last", "0"], "--keep-last")):
        res = orchestrate("cache", *args, env=env)
        assert res.returncode != 0 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert orchestrate("cache", "list", env=env).stdout.strip() == "total: 0 directories, 0 B"
