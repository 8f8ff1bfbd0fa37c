"""Paired statistics from per-token scores: the statistics on synthetic data with a known answer,
and the fork's per-token files against what llama-perplexity itself prints."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import orchestrate
from orchestrator.errors import OrchestrateError
from orchestrator.study import paired, scores
from orchestrator.study.scores import Scores


def make(nll, kld=None, top=None, text_hash=1):
    arrays = {"nll": np.asarray(nll, dtype=np.float32)}
    if kld is not None:
        arrays.update(kld=np.asarray(kld, dtype=np.float32), top=np.asarray(top, dtype=np.float32))
    n_chunk, per_chunk = arrays["nll"].shape
    return Scores(Path("synthetic"), n_chunk, 2 * per_chunk + 2, per_chunk, text_hash, "synthetic", arrays)


def simulate(rng, n_chunks, per_chunk, mu, drift_sd=0.05, noise_sd=0.3):
    """Two variants scored on the same tokens: a shared token difficulty (what pairing removes), a
    per-chunk drift of the difference (tokens of one chunk are not independent), token noise.
    The true mean difference is mu; the variance of the mean of the differences over chunks
    is (drift_sd^2 + 2 noise_sd^2 / per_chunk) / n_chunks."""
    shared = rng.gamma(2.0, 1.5, (n_chunks, per_chunk)) + rng.normal(0, 1.0, (n_chunks, 1))
    drift = rng.normal(0, drift_sd, (n_chunks, 1))
    a = shared + mu + drift + rng.normal(0, noise_sd, (n_chunks, per_chunk))
    b = shared + rng.normal(0, noise_sd, (n_chunks, per_chunk))
    true_var = (drift_sd ** 2 + 2 * noise_sd ** 2 / per_chunk) / n_chunks
    return make(a), make(b), true_var


def test_paired_error_and_bootstrap_interval_have_their_nominal_coverage():
    rng = np.random.default_rng(7)
    mu, sims, n_chunks, per_chunk = 0.05, 400, 40, 64
    covered, se2, means, unpaired = 0, [], [], []
    for _ in range(sims):
        a, b, true_var = simulate(rng, n_chunks, per_chunk, mu)
        c = paired.compare(a, b, draws=2000)
        covered += c["lo"] <= mu <= c["hi"]
        se2.append(c["se"] ** 2)
        means.append(c["mean"])
        unpaired.append(c["unpaired_se"])
    coverage = covered / sims
    # a percentile bootstrap over 40 units covers a little under 95% (about 94%); 400 draws of
    # the experiment have a Monte Carlo error of about 1.1 points
    assert 0.91 <= coverage <= 0.98, coverage
    assert np.mean(se2) == pytest.approx(true_var, rel=0.12)
    assert np.var(means) == pytest.approx(true_var, rel=0.2)
    assert np.mean(means) == pytest.approx(mu, abs=3 * np.sqrt(true_var / sims))
    # what pairing buys here: the unpaired error carries the shared token difficulty
    assert np.mean(unpaired) > 3 * np.sqrt(true_var)


def coverage(n_chunks: int, sims: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(sims):
        a, b, _ = simulate(rng, n_chunks, 32, 0.05)
        c = paired.compare(a, b, draws=1000)
        hits += c["lo"] <= 0.05 <= c["hi"]
    return hits / sims


def test_intervals_start_at_the_fewest_chunks_that_keep_their_coverage():
    """The expanded bootstrap interval covers within two points of 95% from MIN_CHUNKS on; over
    fewer chunks (where the same interval would cover far less) none is given."""
    assert coverage(paired.MIN_CHUNKS, 1500, 11) >= 0.93
    assert coverage(20, 1000, 12) >= 0.93
    # below the threshold the interval would be too narrow: shown with the level it would have had
    rng = np.random.default_rng(13)
    hits = 0
    for _ in range(1500):
        a, b, _ = simulate(rng, 4, 32, 0.05)
        means = (a.arrays["nll"].astype(np.float64) - b.arrays["nll"]).mean(axis=1)
        boot = paired.bootstrap_means(means[:, None], 1000, int(rng.integers(1 << 31)))[:, 0]
        half = paired.expanded_alpha(4) / 2
        lo, hi = np.quantile(boot, [half, 1 - half])
        hits += lo <= 0.05 <= hi
    assert hits / 1500 < 0.93


def test_too_few_chunks_give_no_interval_verdict_or_group_and_never_nan():
    rng = np.random.default_rng(3)
    a, b, _ = simulate(rng, 1, 40, 0.2)
    c = paired.compare(a, b)
    assert c["lo"] is None and c["hi"] is None and c["se"] is None and "at least 8" in c["unavailable"]
    assert not paired.distinguishable(c)
    lines = paired.report_pair("a", "b", a, b)
    text = "\n".join(lines)
    assert "nan" not in text.lower() and "no verdict: 1 chunk scored" in text and "worse" not in text
    few = {n: make(simulate(rng, paired.MIN_CHUNKS - 1, 20, mu)[0].arrays["nll"]) for n, mu in (("x", 0), ("y", 1))}
    st = paired.study(few, "x", None)
    assert st["groups"] is None and "7 chunks scored" in st["unavailable"] and st["vs_base"]["y"]["lo"] is None


def test_student_t_quantiles_match_the_printed_tables():
    # two-sided 95% critical values from printed t tables
    for df, t in ((1, 12.706), (2, 4.303), (5, 2.571), (7, 2.365), (19, 2.093), (60, 2.000)):
        assert paired.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)


def test_mean_difference_is_the_log_perplexity_ratio():
    rng = np.random.default_rng(1)
    a, b, _ = simulate(rng, 12, 50, 0.2)
    c = paired.compare(a, b)
    ppl = [np.exp(s.arrays["nll"].astype(np.float64).mean()) for s in (a, b)]
    assert c["mean"] == pytest.approx(np.log(ppl[0] / ppl[1]), rel=1e-12)
    assert (c["n_chunks"], c["n_tokens"]) == (12, 600)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=6, max_size=6 * 4),
       st.floats(-3, 3, allow_nan=False, width=32))
def test_shift_and_swap(values, shift):
    """Adding a constant to one variant moves the difference and its interval by that constant and
    leaves the error alone; swapping the variants negates the difference and mirrors the interval."""
    n = len(values) // 3 * 3
    x = np.asarray(values[:n], dtype=np.float32).reshape(-1, 3)
    y = np.roll(x, 1)
    xs = (x.astype(np.float64) + shift).astype(np.float32)
    base, moved, swapped = (paired.compare(make(p), make(q), draws=500) for p, q in ((x, y), (xs, y), (y, x)))
    actual = float(np.mean(xs.astype(np.float64) - x.astype(np.float64)))  # the shift after float32 rounding
    if len(x) < paired.MIN_CHUNKS:  # no interval at all, for any of them
        assert all(c["lo"] is None and c["hi"] is None for c in (base, moved, swapped))
        assert moved["mean"] == pytest.approx(base["mean"] + actual, abs=1e-6)
        return
    for k in ("mean", "lo", "hi"):
        assert moved[k] == pytest.approx(base[k] + actual, abs=1e-6)
    assert moved["se"] == pytest.approx(base["se"], abs=1e-6)
    assert (swapped["mean"], swapped["lo"], swapped["hi"]) == pytest.approx((-base["mean"], -base["hi"], -base["lo"]),
                                                                            abs=1e-9)


def test_kld_and_top_token_pairs():
    top_a = np.zeros((10, 20))
    top_a[:, :15] = 1
    top_b = np.zeros((10, 20))
    top_b[:, :12] = 1
    kld_a = np.full((10, 20), 0.3)
    a = make(np.ones((10, 20)), kld_a, top_a)
    b = make(np.ones((10, 20)), kld_a / 3, top_b)
    assert paired.compare(a, b, "top")["mean"] == pytest.approx(0.15)
    assert paired.compare(a, b, "kld")["mean"] == pytest.approx(0.2)
    alone = paired.compare(a, None, "kld")
    assert (alone["mean"], alone["lo"], alone["hi"]) == pytest.approx((0.3, 0.3, 0.3))


def test_groups_of_variants_that_cannot_be_told_apart():
    apart = {("a", "c"), ("b", "d"), ("a", "d")}

    def pair(x, y):
        return {"lo": 0.1, "hi": 0.2} if (x, y) in apart else {"lo": -0.1, "hi": 0.1}
    assert paired.groups(["a", "b", "c", "d"], pair) == [["a", "b"], ["b", "c"], ["c", "d"]]
    assert paired.groups(["a", "b"], lambda x, y: {"lo": -1, "hi": 1}) == [["a", "b"]]
    assert paired.groups(["a", "b", "c"], lambda x, y: {"lo": 1, "hi": 2}) == [["a"], ["b"], ["c"]]


def test_scores_of_other_tokens_are_not_paired():
    rng = np.random.default_rng(2)
    a, b, _ = simulate(rng, 4, 10, 0)
    other = make(b.arrays["nll"], text_hash=2)
    with pytest.raises(OrchestrateError, match="not scored on the same tokens"):
        paired.compare(a, other)


# ---- the fork's per-token files ----------------------------------------------------------------

DEMO = ["--radius", "0,1", "--types", "Q4_0", "--tables", "none"]  # the demo's own -c 512, 20 chunks


@pytest.fixture(scope="module")
def demo_sweep(fork, demo_base, demo_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("paired")
    res = orchestrate("sweep", *DEMO, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}, res


def printed(log: Path, label: str) -> tuple[str, str]:
    """A figure exactly as llama-perplexity printed it (value, error), digits as strings."""
    m = re.search(re.escape(label) + r"\s*[:=]\s*([\d.]+)\s*(?:±|\+/-)\s*([\d.]+)", log.read_text(encoding="utf-8"))
    assert m, f"{label} not in {log}"
    return m.group(1), m.group(2)


def agrees(value: float, text: str) -> bool:
    """value, rounded to the printed number of decimals, is what was printed (or within one unit
    of the last digit where float32 storage puts it on a rounding boundary)."""
    decimals = len(text.split(".")[1])
    return abs(value - float(text)) <= 0.5 * 10 ** -decimals + 1e-9


def test_per_token_scores_reproduce_the_printed_perplexity(demo_sweep):
    out, rows, _ = demo_sweep
    for name in ("base", "q4_0", "q4_0-r1"):
        s = scores.read(out / "scores" / f"{name}.bin")
        assert (s.n_chunk, s.n_ctx, s.per_chunk, list(s.arrays)) == (20, 512, 255, ["nll"])
        nll = s.arrays["nll"].astype(np.float64).ravel()
        ppl, err = printed(Path(rows[name]["score_dir"]) / "perplexity.log", "Final estimate: PPL")
        assert agrees(np.exp(nll.mean()), ppl), (name, np.exp(nll.mean()), ppl)
        # and llama-perplexity's error: the token-level standard error, scaled by the perplexity
        assert agrees(np.exp(nll.mean()) * nll.std() / np.sqrt(len(nll) - 1), err), name
    assert len({scores.read(out / "scores" / f"{n}.bin").text_hash for n in rows}) == 1


def test_paired_error_beats_the_unpaired_one_and_identical_tensors_are_scored_once(demo_sweep):
    out, rows, res = demo_sweep
    a, b = (scores.read(out / "scores" / f"{n}.bin") for n in ("q4_0-r1", "q4_0"))
    c = paired.compare(a, b)
    # the unpaired error llama-perplexity's own figures give: ln-scale errors of the two, combined
    own = np.hypot(rows["q4_0-r1"]["ppl_err"] / rows["q4_0-r1"]["ppl"], rows["q4_0"]["ppl_err"] / rows["q4_0"]["ppl"])
    assert c["se"] < own and c["se"] < c["unpaired_se"]
    assert c["lo"] > 0  # radius 1 is measurably worse than stock Q4_0 on 20 chunks
    # radius 0 and stock Q4_0: one score, measured for q4_0 and shared
    r0, q4 = rows["q4_0-r0"], rows["q4_0"]
    assert r0["tensor_key"] == q4["tensor_key"] and r0["score_dir"] == q4["score_dir"]
    assert q4["scored_for"] == r0["scored_for"] == "q4_0"
    assert res.stderr.count("q4_0-r0: perplexity") == 0 and "q4_0-r0: " in res.stderr
    assert "(same tensors as q4_0: scored once)" in res.stderr
    assert rows["q4_0-r1"]["tensor_key"] != q4["tensor_key"]
    report = (out / "report.md").read_text()
    assert "`q4_0`, `q4_0-r0` have byte-identical tensors and were scored once." in report
    assert (out / "paired_forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    pr = doc["paired"]
    assert pr["reference"] == "q4_0" and pr["ranking"][0] == "base"
    assert pr["vs_reference"]["q4_0-r1"]["nll"]["mean"] == pytest.approx(c["mean"])
    assert any({"q4_0", "q4_0-r0"} <= set(g) for g in pr["groups"])


def test_compare_prints_one_pair(demo_sweep):
    out, rows, _ = demo_sweep
    res = orchestrate("compare", out, "q4_0-r1", "q4_0")
    assert res.returncode == 0, res.stderr
    m = re.search(r"ln\(PPL ratio\)\s+([-+][\d.]+) ± ([\d.]+)\s+\[([-+][\d.]+), ([-+][\d.]+)\]", res.stdout)
    assert m, res.stdout
    ratio = rows["q4_0-r1"]["ppl"] / rows["q4_0"]["ppl"]
    assert float(m.group(1)) == pytest.approx(np.log(ratio), abs=2e-4)  # printed perplexities have 4 decimals
    assert float(m.group(3)) < float(m.group(1)) < float(m.group(4))
    assert "q4_0-r1 is worse than q4_0 at 95%" in res.stdout
    same = orchestrate("compare", out, "q4_0-r0", "q4_0")
    assert same.returncode == 0 and "cannot be told apart" in same.stdout and "+0.00000 ± 0.00000" in same.stdout
    for args, words in (((out, "nosuch", "q4_0"), "no variant nosuch"), ((out / "scores", "a", "b"), "does not exist")):
        bad = orchestrate("compare", *args)
        assert bad.returncode == 1 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_kld_scores_reproduce_the_printed_statistics(fork, demo_base, tmp_path):
    # 8 chunks: the fewest with a paired interval (paired.MIN_CHUNKS), which the last check needs
    res = orchestrate("sweep", "--kld", "--radius", "1", "--tables", "none", "--types", "Q4_0", "--chunks",
                      str(paired.MIN_CHUNKS), "--ctx", "128", "--threads", "2", "--out", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in doc["variants"]}
    for name in ("q4_0", "q4_0-r1"):
        s = scores.read(tmp_path / "scores" / f"{name}.bin")
        assert list(s.arrays) == ["nll", "kld", "top"] and s.n_tokens == paired.MIN_CHUNKS * 63
        log = Path(rows[name]["score_dir"]) / "perplexity.log"
        nll = s.arrays["nll"].astype(np.float64).ravel()
        assert agrees(np.exp(nll.mean()), printed(log, "Mean PPL(Q)")[0]), name
        assert agrees(s.arrays["kld"].astype(np.float64).mean(), printed(log, "Mean    KLD")[0]), name
        assert agrees(100 * s.arrays["top"].astype(np.float64).mean(), printed(log, "Same top p")[0]), name
        assert set(np.unique(s.arrays["top"])) <= {0.0, 1.0}
        for key, label in (("p90", "90.0%   KLD"), ("p99", "99.0%   KLD"), ("p999", "99.9%   KLD"),
                           ("max", "Maximum KLD")):  # the tail, to llama-perplexity's printed precision
            shown = re.search(re.escape(label) + r":\s*([\d.]+)", log.read_text(encoding="utf-8")).group(1)
            assert f"{doc['tails']['variants'][name][key]['value']:.6f}" == shown, (name, key)
            assert f"{rows[name]['kld_' + key]:.6f}" == shown
    tail = doc["tails"]["vs_reference"]["q4_0-r1"]["p99"]
    assert tail["lo"] > 0  # radius 1 has the heavier tail, and this text can tell
    assert (tmp_path / "kld_tail.png").exists() and "## KL divergence tail" in (tmp_path / "report.md").read_text()
    base = scores.read(tmp_path / "scores" / "base.bin")  # written while saving the base's logits
    assert list(base.arrays) == ["nll"] and base.setting() == s.setting()
    # (its own estimate; the variants' "Mean PPL(base)" comes from the 16-bit log-probabilities
    # stored for the KL divergence, which are 1e-6 off)
    assert agrees(np.exp(base.arrays["nll"].astype(np.float64).mean()),
                  printed(Path(rows["base"]["score_dir"]) / "perplexity.log", "Final estimate: PPL")[0])
    c = paired.compare(scores.read(tmp_path / "scores" / "q4_0-r1.bin"), scores.read(tmp_path / "scores" / "q4_0.bin"),
                       "kld")
    assert c["lo"] > 0  # radius 1 moves the distribution further from the base's than stock Q4_0


def _stock_perplexity_library(fork, dest: Path) -> Path:
    """llama-perplexity's library compiled from upstream's own perplexity.cpp (no patch touches it
    but ours), with the very compile command CMake used for the fork's."""
    vendor = fork.build_dir.parent / "llama.cpp"
    src = subprocess.run(["git", "show", "upstream:tools/perplexity/perplexity.cpp"], cwd=vendor, check=True,
                         capture_output=True, text=True).stdout
    assert "pablo" not in src
    (dest / "perplexity.cpp").write_text(src)
    entry = next(e for e in json.loads((fork.build_dir / "compile_commands.json").read_text())
                 if e["file"].endswith("tools/perplexity/perplexity.cpp"))
    args = shlex.split(entry["command"])
    args = [str(dest / "perplexity.cpp") if a == entry["file"] else a for a in args]
    args[args.index("-o") + 1] = str(dest / "perplexity.o")
    args += ["-I", str(vendor / "tools" / "perplexity")]
    subprocess.run(args, cwd=entry["directory"], check=True, capture_output=True)
    lib = dest / "libllama-perplexity-impl.so"
    bin_dir = fork.build_dir / "bin"
    subprocess.run([args[0], "-shared", "-o", str(lib), str(dest / "perplexity.o"), f"-L{bin_dir}", "-lllama-common",
                    "-lllama", "-lggml", "-lggml-base", "-pthread", f"-Wl,-rpath,{bin_dir}"], check=True, capture_output=True)
    return lib


def test_stock_output_is_unchanged_when_no_scores_are_asked_for(fork, demo_base, demo_text, tmp_path):
    import os
    stock = tmp_path / "stock"
    stock.mkdir()
    _stock_perplexity_library(fork, stock)
    cmd = [str(fork.binary("llama-perplexity")), "-m", str(demo_base), "-f", str(demo_text), "-c", "128",
           "--chunks", "4", "-t", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PABLO_", "LLAMA_", "GGML_"))}

    def stdout(extra):
        res = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, check=True)
        # the only timing llama-perplexity prints on stdout: the ETA after the first chunk
        return re.sub(r"(?m)^\d+\.\d+ minutes$", "", res.stdout), res.stderr

    ours, ours_err = stdout({})
    theirs, theirs_err = stdout({"LD_LIBRARY_PATH": str(stock)})
    # (the stock library really was the one loaded: it ignores a request for scores)
    stdout({"LD_LIBRARY_PATH": str(stock), "PABLO_SCORES": str(tmp_path / "ignored.bin")})
    assert not (tmp_path / "ignored.bin").exists() and not (tmp_path / "ignored.bin.partial").exists()
    asked, asked_err = stdout({"PABLO_SCORES": str(tmp_path / "s.bin")})
    assert "pablo" not in ours_err and "pablo" not in theirs_err and "pablo: wrote per-token scores" in asked_err
    assert re.search(r"\[4\]\d", ours)
    assert ours == theirs == asked
    final = [re.search(r"Final estimate: PPL = .*", e).group(0) for e in (ours_err, theirs_err, asked_err)]
    assert final[0] == final[1] == final[2]
    assert not (tmp_path / "s.bin.partial").exists() and scores.read(tmp_path / "s.bin").n_chunk == 4


def test_an_unwritable_scores_file_fails_before_scoring(fork, demo_base, demo_text, tmp_path):
    cmd = [str(fork.binary("llama-perplexity")), "-m", str(demo_base), "-f", str(demo_text), "-c", "128",
           "--chunks", "2", "-t", "2"]
    res = subprocess.run(cmd, env={"PABLO_SCORES": str(tmp_path / "no" / "such" / "dir" / "s.bin")},
                         capture_output=True, text=True)
    assert res.returncode == 1 and "pablo: cannot write per-token scores" in res.stderr
    assert "Final estimate" not in res.stderr and "[1]" not in res.stdout
