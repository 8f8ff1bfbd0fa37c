"""orchestrate used as a researcher would: from their own directory, with relative paths, a
model they made with the tool, K-quant and other types, an ASCII locale, their own
environment variables, and things that go wrong in the middle."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import orchestrate

TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"
# an ASCII-only locale for Python too (no UTF-8 coercion): what LANG=C meant before PEP 538
ASCII_LOCALE = {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}
SMALL = ["--ctx", "128", "--chunks", "3", "--threads", "2"]
# a run key no earlier session has used: these variants really run, whatever the cache holds
FRESH = ["--llama-env", f"ORCHESTRATE_TEST_RUN={os.getpid()}-{os.urandom(4).hex()}"]


@pytest.fixture(scope="module")
def home(fork, demo_text, tmp_path_factory):
    """A user's working directory, outside the checkout, with their own model made by the tool
    (an F16 upcast of the demo model) and their own text, under names of their choosing."""
    from orchestrator import demo
    d = tmp_path_factory.mktemp("user")
    shutil.copy(demo.demo_model(), d / "small-q4_1.gguf")
    res = orchestrate("quantize", "small-q4_1.gguf", "my-model-f16.gguf", "F16", cwd=d)
    assert res.returncode == 0, res.stderr
    shutil.copy(demo_text, d / "notes.txt")
    return d


def test_quantize_with_relative_paths(home):
    res = orchestrate("quantize", "my-model-f16.gguf", "out/r1.gguf", "q4_0", "--radius", "1", "--hist",
                      "out/r1.json", cwd=home)
    assert res.returncode == 0, res.stderr
    assert (home / "out" / "r1.gguf").stat().st_size > 50 << 20
    assert json.loads((home / "out" / "r1.json").read_text())["config"]["q4_0_radius"] == 1
    assert "wrote " + str(home / "out" / "r1.gguf") in res.stdout


@pytest.fixture(scope="module")
def kquant_sweep(home):
    """A sweep over K-quants and other types, with relative paths and an ASCII locale, with --kld
    (whose summary has the non-ASCII ± and Δ)."""
    res = orchestrate("sweep", "--model", "my-model-f16.gguf", "--text", "notes.txt", "--types",
                      "Q4_K_M,q5_k_s,Q6_K,IQ4_NL,Q4_1,BF16", "--radius", "1", "--tables", "none", "--kld",
                      "--out", "sweeps/k", *SMALL, cwd=home, env=ASCII_LOCALE)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((home / "sweeps" / "k" / "results.json").read_text(encoding="utf-8"))


def test_any_quantize_type_is_measured_or_marked_not_applicable(kquant_sweep):
    rows = {r["name"]: r for r in kquant_sweep["variants"]}
    assert list(rows) == ["base", "q4_k_m", "q5_k_s", "q6_k", "iq4_nl", "q4_1", "bf16", "q4_0-r1"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["q5_k_s"]["type"] == "Q5_K_S"  # spelled as llama-quantize spells it
    # a mix names a main type; types need rows of 256 (K-quants) or 32, else llama-quantize falls back
    # (SmolLM2's 576-wide rows): the main type is whichever holds most weights, read from the file
    for name, used in {"q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "q4_1": "Q4_1",
                       "bf16": "BF16", "q4_0-r1": "Q4_0"}.items():
        r = rows[name]
        mix = r["tensor_types"]
        assert used in mix and r["main_type"] == max(mix, key=mix.get), (name, mix)
        assert r["bpw"] > 0 and r["zstd_bpw"] > 0, name
        assert r["weight_rel_rmse"] is not None and r["weight_rel_rmse"] >= 0, name  # gguf decodes all of these
        hooked = r["main_type"] in ("Q4_0", "Q8_0")
        assert (r["zero_fraction"] is not None) == hooked, name   # histograms only where the hooks count
        assert (r["entropy_bpw"] is not None) == hooked, name
        assert 0 < r["kld"] and 0 < r["same_top"] <= 100, name   # the ± / Δ summary parsed under LANG=C
    assert [rows[n]["main_type"] for n in ("q4_1", "bf16", "iq4_nl", "q4_0-r1")] == ["Q4_1", "BF16", "IQ4_NL", "Q4_0"]
    assert rows["bf16"]["weight_rel_rmse"] < rows["q6_k"]["weight_rel_rmse"] < rows["q4_k_m"]["weight_rel_rmse"]
    assert rows["q4_k_m"]["bpw"] < rows["q6_k"]["bpw"] < rows["bf16"]["bpw"]


def test_report_of_the_kquant_sweep_reads_as_utf8(home, kquant_sweep):
    report = (home / "sweeps" / "k" / "report.md").read_text(encoding="utf-8")
    assert "± " in report and "| q4_k_m | Q4_K_M |" in report
    assert kquant_sweep["model"] == str(home / "my-model-f16.gguf")


def test_experiment_file_tables_are_relative_to_the_file(home, tmp_path):
    exp_dir = home / "exps"
    exp_dir.mkdir(exist_ok=True)
    shutil.copy(TABLES / "balanced.table", exp_dir / "mine.table")
    (exp_dir / "e.yaml").write_text("name: mine\ntables: [mine.table]\nradius: []\ntypes: []\n")
    res = orchestrate("sweep", "--config", "exps/e.yaml", "--model", "my-model-f16.gguf", "--text", "notes.txt",
                      "--out", "sweeps/e", *SMALL, cwd=home)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((home / "sweeps" / "e" / "results.json").read_text())["variants"]}
    assert rows["q8_0-mine"]["status"] == "ok" and rows["q8_0-mine"]["table_file"] == str(exp_dir / "mine.table")
    # the same name on the command line is relative to the current directory: not found there
    res = orchestrate("sweep", "--tables", "mine.table", "--radius", "none", "--types", "none", "--out", "x",
                      cwd=home)
    assert res.returncode == 1 and "mine.table" in res.stderr and "cannot open" in res.stderr
    assert not (home / "x").exists()


def test_two_tables_with_one_name_are_refused(home, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(TABLES / "basic.table", tmp_path / sub / "t.table")
    res = orchestrate("sweep", "--tables", "a/t.table,b/t.table", "--out", "o", cwd=tmp_path)
    assert res.returncode == 1 and "two tables named 't'" in res.stderr and len(res.stderr.splitlines()) == 1


def test_tables_fit_with_relative_paths(home):
    res = orchestrate("tables", "fit", "my-model-f16.gguf", "--out", "fitted", cwd=home)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (home / "fitted").iterdir()) == ["my-model-f16-balanced-fit.table",
                                                                   "my-model-f16-optimal.table"]


def test_the_environment_does_not_change_results(home, fork):
    """LLAMA_ARG_*, GGML_* and a stray PABLO_CONF in the user's shell change nothing."""
    stray = home / "stray.conf"
    stray.write_text("MODE = pablo\nQ4_0_RADIUS = 5\n")
    noisy = {"PABLO_CONF": str(stray), "LLAMA_ARG_THREADS": "1", "GGML_CPU_DISABLE_FUSION": "1",
             "LLAMA_ARG_CTX_SIZE": "16"}
    res = orchestrate("quantize", "my-model-f16.gguf", "env.gguf", "Q4_0", cwd=home, env=noisy)
    assert res.returncode == 0, res.stderr
    res = orchestrate("quantize", "my-model-f16.gguf", "plain.gguf", "Q4_0", cwd=home)
    assert res.returncode == 0, res.stderr
    assert (home / "env.gguf").read_bytes() == (home / "plain.gguf").read_bytes()


def test_llama_env_is_passed_and_keys_the_run():
    from orchestrator.proc import clean_env
    from orchestrator.study.experiment import Variant
    from orchestrator.study.runs import Inputs, run_key
    base = dict(fork=type("F", (), {"id": "f"})(), base=type("B", (), {"sha256": "s"})(), text=Path("t"),
                text_id="x", ctx=128, chunks=3, kld=False, threads=2)
    v = Variant("q4_0", "stock", "Q4_0")
    assert run_key(Inputs(**base), v) != run_key(Inputs(**base, llama_env={"OMP_PROC_BIND": "true"}), v)
    os.environ.update(LLAMA_ARG_BATCH="7", GGML_SCHED_DEBUG="1", PABLO_CONF="/x", LLAMACPP_TEST_MODELFILE="y")
    try:
        env = clean_env({"GGML_SCHED_DEBUG": "2"})
    finally:
        for k in ("LLAMA_ARG_BATCH", "GGML_SCHED_DEBUG", "PABLO_CONF", "LLAMACPP_TEST_MODELFILE"):
            del os.environ[k]
    assert env["GGML_SCHED_DEBUG"] == "2" and env["PATH"] == os.environ["PATH"]
    assert not {"LLAMA_ARG_BATCH", "PABLO_CONF", "LLAMACPP_TEST_MODELFILE"} & set(env)


def _with_fault(code: str, *args, cwd, env=None):
    """Run the CLI in a process where `code` first patches something to fail (fault injection)."""
    prog = f"import sys\n{code}\nfrom orchestrator.cli import main\nsys.argv[0] = 'orchestrate'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_a_fault_inside_a_variant_fails_that_variant_only(home):
    code = """
import orchestrator.study.analysis as a
real = a.scan
def boom(path, *args):
    if "/q6_k-" in str(path):  # the q6_k variant's run directory
        raise RuntimeError("injected fault")
    return real(path, *args)
a.scan = boom
"""
    res = _with_fault(code, "sweep", "--model", "my-model-f16.gguf", "--text", "notes.txt", "--types", "Q4_0,Q6_K",
                      "--radius", "none", "--tables", "none", "--out", "sweeps/fault", *SMALL, *FRESH, cwd=home)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: 1 variant(s) failed: q6_k (see the report)"
    rows = {r["name"]: r for r in json.loads((home / "sweeps" / "fault" / "results.json").read_text())["variants"]}
    assert rows["q4_0"]["status"] == "ok" and rows["base"]["status"] == "ok"
    bad = rows["q6_k"]
    assert bad["status"] == "failed" and bad["reason"] == "internal error: RuntimeError: injected fault"
    assert "Traceback" in Path(bad["log"]).read_text() and "injected fault" in Path(bad["log"]).read_text()
    assert "## Failures" in (home / "sweeps" / "fault" / "report.md").read_text()


def test_a_fault_outside_the_variants_is_one_line_and_a_log(home):
    code = """
import orchestrator.report.report as r
def boom(*a, **k):
    raise KeyError("injected")
r.write_all = boom
"""
    res = _with_fault(code, "sweep", "--model", "my-model-f16.gguf", "--text", "notes.txt", "--types", "Q4_0",
                      "--radius", "none", "--tables", "none", "--out", "sweeps/fault2", *SMALL, cwd=home)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines[-1].startswith("error: internal error: KeyError: 'injected'; full trace: ")
    log = Path(lines[-1].split("full trace: ")[1])
    assert "Traceback" in log.read_text() and "boom" in log.read_text()


def test_ctrl_c_is_one_line_and_the_sweep_resumes(home):
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", "--model", "my-model-f16.gguf",
                             "--text", "notes.txt", "--types", "Q4_0,Q5_0", "--radius", "none", "--tables", "none",
                             "--out", "sweeps/int", *SMALL, *FRESH], cwd=home, stderr=subprocess.PIPE, text=True)
    import signal
    seen = []
    for line in proc.stderr:  # this sweep's own progress: the second stock variant is being quantized
        seen.append(line)
        if "q5_0: quantize" in line:
            break
    proc.send_signal(signal.SIGINT)
    err = "".join(seen) + proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted; run the same command again to resume"
    assert "Traceback" not in err
    res = orchestrate("sweep", "--model", "my-model-f16.gguf", "--text", "notes.txt", "--types", "Q4_0,Q5_0",
                      "--radius", "none", "--tables", "none", "--out", "sweeps/int", *SMALL, *FRESH, cwd=home)
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(r["status"] == "ok" for r in json.loads((home / "sweeps/int/results.json").read_text())["variants"])


def test_plot_takes_the_sweep_lock(home, kquant_sweep):
    import filelock
    out = home / "sweeps" / "k"
    with filelock.FileLock(str(out / ".sweep.lock")).acquire(timeout=0):
        res = orchestrate("plot", "sweeps/k", cwd=home)
    assert res.returncode == 1 and "another sweep is writing to" in res.stderr
    assert orchestrate("plot", "sweeps/k", cwd=home).returncode == 0


def test_a_model_is_unmapped_before_it_is_deleted(home, tmp_path):
    from orchestrator.study import analysis, stats
    model = tmp_path / "m.gguf"
    shutil.copy(home / "small-q4_1.gguf", model)
    stats.recount(model, "Q4_1")
    maps = lambda: Path("/proc/self/maps").read_text()  # noqa: E731
    assert str(model) in maps()
    analysis.release(model)
    assert str(model) not in maps()


def test_fork_identity_does_not_depend_on_ccache(fork, tmp_path):
    """A PATH without ccache (as before installing it): no rebuild, the same fork id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cmake", "gcc", "g++", "cc", "c++", "git", "ninja", "make"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    res = orchestrate("build", env={"PATH": str(bin_dir)})
    assert res.returncode == 0 and "up to date" in res.stderr, res.stderr
    assert json.loads(orchestrate("info", "--json", check=True).stdout)["fork_id"] == fork.id


def test_untracked_source_files_count_by_content(tmp_path):
    import git as gitpy

    from orchestrator.fork import build, upstream
    repo = gitpy.Repo.init(tmp_path)
    (tmp_path / "a.c").write_text("int a;\n")
    repo.git.add("a.c")
    repo.git.commit("-qm", "a", env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                                     "GIT_COMMITTER_EMAIL": "t@t"})
    pin = upstream.Pin("git", url="x", commit="0" * 40)
    clean = build.inputs_stamp(repo, pin, [])
    (tmp_path / "new.c").write_text("int b = 1;\n")
    one = build.inputs_stamp(repo, pin, [])
    (tmp_path / "new.c").write_text("int b = 2;\n")
    two = build.inputs_stamp(repo, pin, [])
    assert len({clean["id"], one["id"], two["id"]}) == 3


def test_written_files_respect_the_umask_and_leave_no_temp(tmp_path):
    from orchestrator.files import write_atomic
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        with pytest.raises(TypeError):
            write_atomic(tmp_path / "b.json", 12345)  # not bytes: fails while writing
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_term_and_hangup_unwind_like_ctrl_c(home, tmp_path, sig):
    """Killed politely mid-quantize: one line naming the signal, exit 128+n, no temporary file left in
    the run cache or the output, and the same command resumes."""
    import signal
    from orchestrator.paths import fresh_cache
    cache = fresh_cache(tmp_path / "cache")
    args = [sys.executable, "-m", "orchestrator", "sweep", "--model", "my-model-f16.gguf", "--text", "notes.txt",
            "--types", "Q4_0,Q5_0", "--radius", "none", "--tables", "none", "--out", f"sweeps/{sig}", *SMALL]
    env = {**os.environ, "ORCHESTRATE_CACHE": str(cache)}
    proc = subprocess.Popen(args, cwd=home, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "q5_0: quantize" in line:
            break
    proc.send_signal(getattr(signal, sig))
    err = "".join(seen) + proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert err.strip().splitlines()[-1] == f"error: interrupted ({sig}); run the same command again to resume"
    assert "Traceback" not in err
    left = [p for p in [*(cache / "runs").rglob("*"), *(home / "sweeps" / sig).rglob("*")]
            if p.name.startswith(".quantize-") or p.name.endswith((".tmp", ".partial"))]
    assert left == [], left
    res = subprocess.run(args, cwd=home, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
