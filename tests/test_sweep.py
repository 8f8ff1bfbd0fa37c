"""`orchestrate sweep` end to end on the demo model and text, with small settings."""

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

from conftest import orchestrate
from orchestrator import paths
from orchestrator.study import experiment
from orchestrator.errors import OrchestrateError

SMALL = ["--radius", "0..2", "--chunks", "3", "--ctx", "128", "--threads", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def swept(fork, demo_base, demo_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    res = orchestrate("sweep", *SMALL, "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), res


def by_name(doc):
    return {r["name"]: r for r in doc["variants"]}


def test_every_variant_scored(swept):
    out, doc, _ = swept
    rows = by_name(doc)
    assert list(rows) == ["base", "q4_0", "q8_0", "q8_0-basic", "q8_0-balanced", "q8_0-balanced-fit", "q8_0-optimal",
                          "q4_0-r0", "q4_0-r1", "q4_0-r2"]
    for r in rows.values():
        assert r["status"] == "ok" and math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["ppl_err"] > 0, r["name"]
        assert len(r["ppl_chunks"]) == 3 and r["ppl_chunks"][-1] == r["ppl"]
        assert r["perplexity_seconds"] > 0 and r["commands"]
        # the report's commands name files that outlive the run, not the quantizer's temporary directory
        assert not any(".quantize-" in arg for c in r["commands"] for arg in c), r["commands"]
    # radius 0 changes no weight, so it scores exactly like stock Q4_0
    assert rows["q4_0-r0"]["ppl"] == rows["q4_0"]["ppl"] and rows["q4_0-r0"]["ppl_chunks"] == rows["q4_0"]["ppl_chunks"]
    assert rows["q4_0"]["bpw"] < rows["q8_0"]["bpw"] < rows["base"]["bpw"]


def test_zeros_grow_with_radius_and_match_the_histograms(swept):
    out, doc, _ = swept
    rows = by_name(doc)
    zf = [rows[f"q4_0-r{r}"]["zero_fraction"] for r in range(3)]
    assert zf[0] < zf[1] < zf[2]
    for name in ("q4_0", "q4_0-r0", "q4_0-r1", "q4_0-r2", "q8_0", "q8_0-balanced"):
        r = rows[name]
        hist = json.loads((out / r["hist"]).read_text())
        m = hist["model"][r["type"].lower()]
        if m["bins"] == "value":
            zeros = m["values"][-m["bin_min"]]
        else:
            zeros = m["values"][hist["config"]["table"]["level"].index(0)]
        assert r["zero_fraction"] == zeros / m["elements"], name
        assert r["isolated_zero_share"] == m["zero_runs"][0] / zeros, name


def test_outputs_figures_and_report(swept):
    out, doc, res = swept
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,kind,type,mode,radius,table,status,ppl,ppl_err") and len(csv_lines) == 11
    pngs = sorted(out.glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"perplexity", "perplexity_vs_radius", "zero_runs", "q8_0_values", "table_codes", "ppl_vs_bits",
            "damage-q4_0-r2", "values-q4_0-r1", "values-q8_0-balanced", "values-q8_0-optimal"} <= names
    import matplotlib.image
    for p in pngs:
        assert p.read_bytes()[:8] == PNG
        h, w, _ = matplotlib.image.imread(p).shape
        assert h > 100 and w > 100
        assert p.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    report = (out / "report.md").read_text()
    assert "F16 upcast of a Q4_1 model" in report
    for p in pngs:
        assert f"]({p.name})" in report
    assert "report.md" in res.stdout
    # `orchestrate plot` redraws from results.json alone
    (out / "perplexity.png").unlink()
    orchestrate("plot", out, check=True)
    assert (out / "perplexity.png").read_bytes()[:8] == PNG


def _alive(pid: int) -> bool:
    """Running (a zombie has ended; it waits only for whoever adopted it to reap it)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="figures are drawn in one process on one core")
def test_killed_plot_leaves_no_drawing_process_and_no_half_written_figure(swept, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(swept[0], out)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "plot", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    drawing = _children(proc.pid)
    assert len(drawing) >= 2, "no drawing processes seen"
    proc.terminate()  # the parent only, as a scheduler's kill would
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(map(_alive, drawing)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in drawing if _alive(c)]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in swept[0].iterdir())
    import matplotlib.image
    for p in out.glob("*.png"):  # every figure whole: its end chunk there, and it decodes
        data = p.read_bytes()
        assert data[:8] == PNG and data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", p.name
        assert matplotlib.image.imread(p).shape[0] > 100, p.name
    for p in out.glob("*.svg"):
        assert p.read_text().rstrip().endswith("</svg>"), p.name


# `orchestrate ARGS`, SIGTERMed DELAY seconds after its first fork: while the drawing pool is still
# starting its workers (the fork hooks themselves swallow a signal's exception, hence the timer)
_TERM_AFTER_FIRST_FORK = """
import os, signal, sys
from orchestrator.cli import main
armed = [True]
def arm():
    if armed:
        armed.clear()
        signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
os.register_at_fork(after_in_parent=arm)
main(sys.argv[2:])
"""


def _in_session(sid: int) -> list[int]:
    pids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and _alive(int(stat_file.parent.name)):
            pids.append(int(stat_file.parent.name))
    return pids


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="figures are drawn in one process on one core")
def test_a_plot_killed_while_its_workers_start_ends_and_leaves_nothing(swept, tmp_path):
    """A SIGTERM while the pool forks once left a worker the pool never knew of; the interpreter's exit
    then waited on it for ever (6 of 20 such runs hung). Delays span the forks of the workers."""
    for delay in (0.0003, 0.0004, 0.0005, 0.0006, 0.0008, 0.001, 0.0015, 0.003):
        out = tmp_path / f"out-{delay}"
        shutil.copytree(swept[0], out)
        proc = subprocess.Popen([sys.executable, "-c", _TERM_AFTER_FIRST_FORK, str(delay), "plot", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"a plot SIGTERMed {delay} s after its first fork did not end")
        # (exit 0 when the signal came while the parent ran a fork hook: Python drops what is raised there)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        deadline = time.monotonic() + 10
        while _in_session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _in_session(proc.pid), f"drawing processes left behind (delay {delay} s)"
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in swept[0].iterdir())


class _KilledWhileSent:
    """A drawing's result whose sending back is interrupted by the parent-death signal."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs here, inside the pool's sending of the result
        return (int, (0,))


def _killed_while_sent():
    return _KilledWhileSent()


@pytest.mark.skipif(sys.platform != "linux", reason="figures are drawn in forked processes on Linux only")
def test_a_drawing_process_ends_even_when_the_pool_swallows_its_exit():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from orchestrator.report import plots
    before = set(_children(os.getpid()))
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                               initializer=plots._die_with_parent, initargs=(os.getpid(),))
    try:
        with pytest.raises(SystemExit):  # the pool reports the exit instead of ending the process
            pool.submit(plots._draw, _killed_while_sent, ()).result(timeout=30)
        workers = set(_children(os.getpid())) - before
        assert workers
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_second_run_starts_no_llama_process(swept, fork):
    out, doc, _ = swept
    bins = [fork.binary(t) for t in ("llama-quantize", "llama-perplexity")]
    modes = [b.stat().st_mode for b in bins]
    try:
        for b in bins:  # any attempt to run them now would fail the sweep
            b.chmod(b.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
        res = orchestrate("sweep", *SMALL, "--out", out)
    finally:
        for b, m in zip(bins, modes):
            b.chmod(m)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("(cached)") == 10
    again = json.loads((out / "results.json").read_text())
    assert [r["ppl"] for r in again["variants"]] == [r["ppl"] for r in doc["variants"]]


def test_killed_sweep_resumes_to_the_same_results(swept, tmp_path):
    out, doc, _ = swept
    # a separate run cache (sharing only facts about files) so nothing is reused from `swept`
    cache = paths.fresh_cache(tmp_path / "cache")
    env = {"ORCHESTRATE_CACHE": str(cache)}
    out2 = tmp_path / "out"
    cmd = [sys.executable, "-m", "orchestrator", "sweep", *SMALL, "--out", str(out2)]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runs = cache / "runs"
    deadline = time.monotonic() + 300
    # kill -9 in the middle of a variant: once the third variant is busy quantizing or scoring
    while time.monotonic() < deadline and proc.poll() is None:
        busy = [d for d in runs.glob("q8_0-*") if any(d.glob(".quantize-*")) or (d / "analysis.json").exists()]
        if busy and not (busy[0] / "result.json").exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out2 / "results.json").exists()
    res = orchestrate("sweep", *SMALL, "--out", out2, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(cached)" in res.stderr  # the variants finished before the kill were not redone
    resumed = json.loads((out2 / "results.json").read_text())
    keys = ("name", "status", "zero_fraction", "isolated_zero_share", "bpw", "file_bytes")
    assert [{k: r[k] for k in keys} for r in resumed["variants"]] == [{k: r[k] for k in keys} for r in doc["variants"]]
    # llama-perplexity prints 4 decimals; a broken variant's 1e16 perplexity shows float noise in its
    # last printed digits from run to run, so compare to 1e-9 relative
    for a, b in zip(resumed["variants"], doc["variants"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-9) and a["ppl_err"] == pytest.approx(b["ppl_err"], rel=1e-9)
        assert a["ppl_chunks"] == pytest.approx(b["ppl_chunks"], rel=1e-9)
    for r in resumed["variants"][1:]:
        a, b = (json.loads((d / r["hist"]).read_text()) for d in (out2, out))
        for h in (a, b):  # where the run's configuration and table files were differs between sweeps
            for key in ("file", "table_file", "table_mode"):
                h["config"].pop(key, None)
        assert a == b, r["name"]


def test_two_sweeps_on_one_directory_are_refused(fork, tmp_path):
    lock = filelock.FileLock(str(tmp_path / ".sweep.lock"))
    with lock.acquire(timeout=0):
        res = orchestrate("sweep", *SMALL, "--out", tmp_path)
    assert res.returncode == 1
    assert "another sweep is writing to" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_experiment_files_are_validated(tmp_path):
    assert [v.name for v in experiment.load_experiment().variants()] == [
        "base", "q4_0", "q8_0", "q8_0-basic", "q8_0-balanced", "q8_0-balanced-fit", "q8_0-optimal",
        "q4_0-r0", "q4_0-r1", "q4_0-r2", "q4_0-r3"]
    assert experiment.parse_radius("0..3") == [0, 1, 2, 3]
    assert experiment.parse_radius("3,1") == [1, 3] and experiment.parse_radius("2") == [2]
    for bad in ("0..9", "a", "1,,2", "-1"):
        with pytest.raises(OrchestrateError):
            experiment.parse_radius(bad)
    cases = {"radius: [1, 9]\n": "radius", "tables: [nosuch]\n": "unknown table", "colour: red\n": "unknown key",
             "perplexity: {ctx: 4}\n": "ctx", "- a list\n": "mapping", "rules: [a]\n": "rules is a mapping",
             "rules: {x: {type: Q4_0}}\n": "takes type and tensors",
             "rules: {x: {type: Q4_0, tensors: ['blk.*']}}\n": "needs a pattern and a setting",
             "rules: {x: {type: Q4_0, radius: 9, tensors: ['a Q4_0_RADIUS=1']}}\n": "radius must be"}
    for text, msg in cases.items():
        p = tmp_path / "e.yaml"
        p.write_text(text)
        with pytest.raises(OrchestrateError, match=msg):
            experiment.load_experiment(p)
    res = orchestrate("sweep", "--config", p)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_kl_divergence_against_the_base(fork, demo_base, tmp_path):
    res = orchestrate("sweep", "--kld", "--radius", "2", "--tables", "none", "--types", "Q4_0", "--chunks", "3",
                      "--ctx", "128", "--threads", "2", "--out", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "note: --kld stores the base's logits once (about 0.0 GB)" in res.stdout
    rows = by_name(json.loads((tmp_path / "results.json").read_text()))
    assert rows["base"]["kld"] is None
    q4, r2 = rows["q4_0"], rows["q4_0-r2"]
    assert 0 < q4["kld"] < r2["kld"] and 0 < r2["same_top"] < q4["same_top"] < 100
    assert "KLD" in (tmp_path / "report.md").read_text()
    logits = Path(rows["base"]["score_dir"]) / "logits.bin"
    estimate = 49152 * 2 * 64 * 3  # vocabulary x 2 bytes x scored tokens: what the warning said
    assert abs(logits.stat().st_size - estimate) < 0.05 * estimate
    again = orchestrate("sweep", "--kld", "--radius", "2", "--tables", "none", "--types", "Q4_0", "--chunks", "3",
                        "--ctx", "128", "--threads", "2", "--out", tmp_path)
    assert again.returncode == 0 and again.stderr.count("(cached)") == 3


def test_perplexity_chunks_are_reported_while_it_runs(fork, demo_base, tmp_path):
    # at 7B a chunk takes minutes; llama-perplexity prints each pass's chunks without ending the line
    from orchestrator import demo
    from orchestrator.tools import perplexity
    scoring = perplexity.Scoring(demo.demo_text(), ctx=512, chunks=8, threads=2)
    reports = []
    res = perplexity.run(fork, demo_base, scoring, tmp_path / "p.log", tmp_path / "s.bin", {},
                         on_chunks=lambda p, secs: reports.append((p.done, p.total)))
    assert len(res["chunks"]) == 8
    # 4 chunks a pass (batch 2048 / ctx 512): the first pass is told before the second ends (read
    # line by line, all 8 would come at once, at the end)
    assert reports[0][0] <= 4 and reports[-1] == (8, 8), reports
    assert [d for d, _ in reports] == sorted({d for d, _ in reports}), reports


def test_quantize_reports_its_tensors_as_it_goes(fork, demo_base, tmp_path):
    import gguf
    from orchestrator.tools.quantize import run_quantize
    reports = []
    run_quantize(fork, demo_base, tmp_path / "q.gguf", "Q8_0", progress=False,
                 on_tensor=lambda done, total: reports.append((done, total)))
    n = len(gguf.GGUFReader(demo_base).tensors)
    assert reports == [(k, n) for k in range(1, n + 1)]


def test_an_experiment_with_per_tensor_rules(q, tmp_path):
    """An experiment's `rules:` variant is quantized with its TENSOR rules: each tensor is the one its
    first matching rule's setting gives (stock where none matches), and the run is cached by them."""
    import numpy as np
    from orchestrator.hooks import conf
    from orchestrator.hooks.conf import Hooks
    from orchestrator.study import analysis
    exp = tmp_path / "rules.yaml"
    exp.write_text("name: rules-demo\nrules:\n  ffn-down-r2:\n    type: Q4_0\n"
                   "    tensors: ['*ffn_down* Q4_0_RADIUS=2', 'blk.0.* Q4_0_RADIUS=2']\n"
                   "perplexity: {ctx: 128, chunks: 2}\n")
    out = tmp_path / "out"
    res = orchestrate("sweep", "--config", exp, "--keep-models", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    row = next(r for r in json.loads((out / "results.json").read_text())["variants"] if r["name"] == "ffn-down-r2")
    assert row["status"] == "ok" and row["kind"] == "rules"

    def tensors(path):
        return {t.name: np.asarray(t.data).tobytes() for t in analysis.open_model(path).tensors}
    stock, r2 = (tensors(q(n, "Q4_0", hooks=h)[0]) for n, h in (("simple-hist-Q4_0", Hooks()),
                                                                 ("r2-global", Hooks(True, radius=2))))
    rules = (conf.Rule("*ffn_down*", radius=2), conf.Rule("blk.0.*", radius=2))
    named = 0
    for name, data in tensors(Path(row["run_dir"]) / "model.gguf").items():
        hit = conf.rule_for(rules, name) is not None
        named += hit
        assert data == (r2 if hit else stock)[name], name
    assert named > 30
    hist = json.loads((out / row["hist"]).read_text())
    assert [r["pattern"] for r in hist["config"]["rules"]] == ["*ffn_down*", "blk.0.*"]
    assert 0 < row["zero_fraction"]
