"""The fork's quantization hooks on the real demo model, read back with gguf and numpy."""

import filecmp
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import orchestrate
from test_conf import REASONS
from orchestrator.hooks.conf import Hooks
from orchestrator.hooks import conf
from orchestrator.study import analysis, stats
from orchestrator.parse import parse_perplexity
from orchestrator.proc import clean_env

TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"
BAD = sorted((Path(__file__).parent / "data" / "bad_confs").glob("*.conf"))


def tensors(path):
    return {t.name: t for t in analysis.hooked_tensors(analysis.open_model(path))}


def decoded(t):
    return analysis.decode(t, analysis.blocks(t))


def run_binary(fork, args, cwd, env=None):
    e = {**clean_env(), **(env or {})}
    return subprocess.run([str(fork.binary("llama-quantize")), *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_hooks_off_and_simple_mode_are_byte_identical(fork, demo_base, q, tmp_path, qtype):
    off, _ = q(f"off-{qtype}", qtype, hist=False)
    (tmp_path / "pablo.conf").write_text("MODE = simple\n")  # found in the working directory
    res = run_binary(fork, [demo_base, tmp_path / "simple.gguf", qtype, 2], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "MODE=simple" in res.stdout + res.stderr
    assert filecmp.cmp(off, tmp_path / "simple.gguf", shallow=False)
    simple_hist, _ = q(f"simple-hist-{qtype}", qtype, hist=True)  # histograms on: still stock bytes
    assert filecmp.cmp(off, simple_hist, shallow=False)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_radius_zeroes_exactly_the_small_values(q, radius):
    off, _ = q("off-Q4_0", "Q4_0", hist=False)
    out, _ = q(f"r{radius}", "Q4_0", hooks=Hooks(True, radius=radius))
    a, b = tensors(off), tensors(out)
    assert a.keys() == b.keys()
    changed = 0
    for name, ta in a.items():
        (sa, va), (sb, vb) = decoded(ta), decoded(b[name])
        assert np.array_equal(sa.view(np.uint16), sb.view(np.uint16)), name  # every scale kept
        if ta.tensor_type != analysis.Q4_0:
            assert np.array_equal(va, vb), name  # Q8_0 tensors of a Q4_0 model are untouched
            continue
        small = (np.abs(va) <= radius) & (va != 0)
        assert np.all(vb[small] == 0), name
        assert np.array_equal(vb[~small], va[~small]), name
        changed += int(small.sum())
    assert changed > 0


@pytest.mark.parametrize("table", ["basic", "balanced"])
def test_table_stores_the_level_of_each_stock_value(q, table):
    t = conf.load_table(TABLES / f"{table}.table")
    off, _ = q("off-Q8_0", "Q8_0", hist=False)
    out, _ = q(f"table-{table}", "Q8_0", hooks=Hooks(True, table=t))
    a, b = tensors(off), tensors(out)
    assert a.keys() == b.keys() and a
    for name, ta in a.items():
        (sa, va), (sb, vb) = decoded(ta), decoded(b[name])
        assert np.array_equal(sa.view(np.uint16), sb.view(np.uint16)), name
        assert np.array_equal(vb, t.translate(va)), name
    assert len(np.unique(vb)) <= 16


def _check_hist_matches_file(model, hist_json, table=None):
    doc = json.loads(Path(hist_json).read_text())
    assert doc["schema"] == "orchestrate.pablo-hist/2"
    codes_of = None
    if table is not None:
        codes_of = np.zeros(256, dtype=np.int64)
        for c, lev in enumerate(table.level):
            codes_of[lev + 128] = c
    by_name = {e["name"]: e for e in doc["tensors"]}
    reader = analysis.open_model(model)
    assert set(by_name) == {t.name for t in reader.tensors}
    totals = {}
    for t in reader.tensors:
        e = by_name[t.name]
        if t.tensor_type not in analysis.BLOCK:
            assert e["hooked"] is False
            continue
        assert e["hooked"] is True and e["type"] == t.tensor_type.name.lower()
        h = analysis.tensor_hist(t, codes_of if t.tensor_type == analysis.Q8_0 else None)
        assert e["values"] == h.values.tolist(), t.name
        assert e["zero_runs"] == h.zero_runs.tolist(), t.name
        assert e["long_run_pieces"] == h.long_run_pieces, t.name
        assert e["elements"] == t.n_elements and e["bin_min"] == h.bin_min
        tot = totals.setdefault(e["type"], [0, 0, 0])
        tot[0] = tot[0] + h.values
        tot[1] = tot[1] + h.zero_runs
        tot[2] += h.long_run_pieces
    assert set(doc["model"]) == set(totals)
    for typ, (values, runs, pieces) in totals.items():
        assert doc["model"][typ]["values"] == values.tolist()
        assert doc["model"][typ]["zero_runs"] == runs.tolist()
        assert doc["model"][typ]["long_run_pieces"] == pieces
    return doc


def test_histograms_equal_a_recount_from_the_file_for_1_and_2_threads(q):
    one, h1 = q("r2-t1", "Q4_0", hooks=Hooks(True, radius=2), threads=1)
    two, h2 = q("r2-t2", "Q4_0", hooks=Hooks(True, radius=2), threads=2)
    assert filecmp.cmp(one, two, shallow=False)
    d1, d2 = _check_hist_matches_file(one, h1), _check_hist_matches_file(two, h2)
    assert d1["tensors"] == d2["tensors"] and d1["model"] == d2["model"]
    m = d1["model"]["q4_0"]
    assert m["bins"] == "value" and m["bin_min"] == -8 and m["values"][8 - 2:8] == [0, 0]
    assert d1["config"]["mode"] == "pablo" and d1["config"]["q4_0_radius"] == 2


def test_histograms_of_plain_and_table_q8_0(q):
    out, h = q("simple-hist-Q8_0", "Q8_0")
    doc = _check_hist_matches_file(out, h)
    assert doc["model"]["q8_0"]["bins"] == "value" and len(doc["model"]["q8_0"]["values"]) == 256
    t = conf.load_table(TABLES / "balanced.table")
    for threads in (1, 2):
        out, h = q(f"bal-t{threads}", "Q8_0", hooks=Hooks(True, table=t), threads=threads)
        doc = _check_hist_matches_file(out, h, table=t)
        assert doc["model"]["q8_0"]["bins"] == "code" and len(doc["model"]["q8_0"]["values"]) == 16
        assert doc["config"]["table"]["level"] == list(t.level)


def test_inference_is_untouched_by_a_configuration(fork, q, demo_text, tmp_path):
    model, _ = q("off-Q4_0", "Q4_0", hist=False)
    bad_idea = tmp_path / "radius.conf"
    bad_idea.write_text(f"MODE = pablo\nQ4_0_RADIUS = 3\nTABLE_MODE = {TABLES / 'basic.table'}\n")
    (tmp_path / "pablo.conf").write_text(bad_idea.read_text())
    runs = []
    for env in ({}, {"PABLO_CONF": str(bad_idea)}):
        e = {**clean_env(), **env}
        res = subprocess.run([str(fork.binary("llama-perplexity")), "-m", str(model), "-f", str(demo_text),
                              "-c", "128", "--chunks", "4", "-t", "2", "-b", "128"],
                             cwd=tmp_path if env else None, env=e, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(parse_perplexity(res.stdout + res.stderr))
    assert runs[0]["ppl"] == runs[1]["ppl"] and runs[0]["chunks"] == runs[1]["chunks"]
    assert len(runs[0]["chunks"]) == 4


@pytest.mark.parametrize("bad", BAD, ids=[p.stem for p in BAD])
def test_bad_configuration_rejected_by_c_and_python_before_writing(fork, demo_base, tmp_path, bad):
    with pytest.raises(conf.ConfError):
        conf.parse_conf(bad)
    out = tmp_path / "out.gguf"
    res = run_binary(fork, [demo_base, out, "Q4_0", 2], cwd=tmp_path, env={"PABLO_CONF": str(bad)})
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"pablo config error: {REASONS[bad.stem]}" in text.replace(f"{bad.parent}/", ""), text[-1500:]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_named_configuration_must_exist(fork, demo_base, tmp_path):
    res = run_binary(fork, [demo_base, tmp_path / "o.gguf", "Q4_0", 2], cwd=tmp_path,
                     env={"PABLO_CONF": str(tmp_path / "missing.conf")})
    assert res.returncode != 0 and "missing.conf: cannot open" in res.stdout + res.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_legacy_file_in_working_directory(fork, demo_base, q, tmp_path):
    (tmp_path / "pablo.conf").write_text("1 2 0\n")
    res = run_binary(fork, [demo_base, tmp_path / "legacy.gguf", "Q4_0", 2], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    r2, _ = q("r2-t2", "Q4_0", hooks=Hooks(True, radius=2), threads=2)
    assert filecmp.cmp(r2, tmp_path / "legacy.gguf", shallow=False)


def test_cli_quantize_upcasts_and_cleans_up(fork, tmp_path):
    from orchestrator import demo
    out = tmp_path / "r1.gguf"
    res = orchestrate("quantize", demo.demo_model(), out, "Q4_0", "--radius", "1", "--hist", tmp_path / "h.json")
    assert res.returncode == 0, res.stderr
    assert out.exists() and json.loads((tmp_path / "h.json").read_text())["config"]["q4_0_radius"] == 1
    res = orchestrate("quantize", demo.demo_model(), tmp_path / "bad.gguf", "Q8_0", "--table", "nosuch")
    assert res.returncode == 1 and res.stderr.startswith("error: unknown table 'nosuch'")
    res = orchestrate("quantize", demo.demo_model(), tmp_path / "bad.gguf", "NOT_A_TYPE")
    assert res.returncode == 1 and "unknown quantization type 'NOT_A_TYPE'" in res.stderr
    # a failure inside llama-quantize: the reason, the log, and no output
    res = orchestrate("quantize", demo.demo_model(), tmp_path / "bad.gguf", "Q4_0", "--", "--no-such-option")
    assert res.returncode == 1 and "llama-quantize failed" in res.stderr and "log:" in res.stderr
    assert not (tmp_path / "bad.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["h.json", "r1.gguf"]


@pytest.mark.parametrize("name,qtype,kw", [
    ("err-q4_0", "Q4_0", {}), ("err-r2", "Q4_0", {"hooks": Hooks(True, radius=2)}), ("err-table", "Q8_0", "balanced"),
    ("err-q4_k_m", "Q4_K_M", {}), ("err-iq4_nl", "IQ4_NL", {}), ("err-bf16", "BF16", {})])
def test_hooks_measure_the_error_an_independent_pass_finds(q, demo_base, name, qtype, kw):
    """The error sums the hooks take while quantizing agree with numpy's pass over both files (1e-6)."""
    if kw == "balanced":
        kw = {"hooks": Hooks(True, table=conf.load_table(TABLES / "balanced.table"))}
    out, h = q(name, qtype, **kw)
    hooks = json.loads(h.read_text())
    measured = [t for t in hooks["tensors"] if "sq_err" in t]
    assert measured and all(t["measured"] > 0 and t["sq_norm"] > 0 for t in measured)
    from_hooks, by_numpy = stats.damage(demo_base, out, hooks), stats.damage(demo_base, out)
    assert from_hooks["model_rel_rmse"] == pytest.approx(by_numpy["model_rel_rmse"], rel=1e-6)
    assert by_numpy["model_rel_rmse"] > 0
    for a, b in zip(from_hooks["tensors"], by_numpy["tensors"]):
        assert a["name"] == b["name"] and a["rel_rmse"] == pytest.approx(b["rel_rmse"], rel=1e-6, abs=1e-12), a["name"]


def _measured(hist_json: Path) -> dict:
    """What the hooks measured: the histogram document less where its configuration was written and
    which loops measured it."""
    doc = json.loads(hist_json.read_text())
    del doc["config"]["file"], doc["config"]["loops"]
    return doc


def _cpu_has_avx2():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx2" in flags


@pytest.mark.skipif(not _cpu_has_avx2(), reason="the hooks' AVX2 loops need an AVX2 CPU")
@pytest.mark.parametrize("name,qtype,kw", [
    ("err-r2", "Q4_0", {"hooks": Hooks(True, radius=2)}), ("q8-plain", "Q8_0", {}), ("err-q4_k_m", "Q4_K_M", {})])
def test_the_hooks_avx2_and_portable_loops_give_the_same_bits(q, name, qtype, kw):
    """Counts and error sums are the same bits on an AVX2 CPU and on one without (PABLO_PORTABLE=1
    takes the portable C loops), so results do not depend on the machine that quantized."""
    fast_out, fast = q(name, qtype, **kw)
    slow_out, slow = q(name + "-portable", qtype, env={"PABLO_PORTABLE": "1"}, **kw)
    loops = [json.loads(h.read_text())["config"]["loops"] for h in (fast, slow)]
    assert loops == ["avx2", "portable"]  # each path really ran
    a = _measured(fast)
    assert a == _measured(slow)
    assert any("sq_err" in t for t in a["tensors"])
    assert fast_out.read_bytes() == slow_out.read_bytes()


@pytest.mark.parametrize("name,qtype,kw", [("q8-plain", "Q8_0", {}), ("err-q4_k_m", "Q4_K_M", {})])
def test_a_tensor_measured_in_many_slabs_gives_the_same_bits(q, name, qtype, kw):
    """llama-quantize --max-buffer-size cuts each tensor into slabs of rows: the counts and error sums
    (added in row order, slab after slab) are the same bits as with each tensor in one slab."""
    one_out, one = q(name, qtype, **kw)
    many_out, many = q(name + "-1mib", qtype, extra=["--max-buffer-size", "1"], threads=2, **kw)
    assert _measured(one) == _measured(many)
    assert one_out.read_bytes() == many_out.read_bytes()


def _tensor_bytes(path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in analysis.open_model(path).tensors}


def test_rules_change_exactly_the_tensors_they_name(q):
    """Per-tensor rules, first match wins: each tensor is byte-for-byte the tensor of the model made
    with its rule's setting applied globally, and the histograms name the rule that applied."""
    rules = (conf.Rule("blk.1.*", radius=2), conf.Rule("*ffn_down*", radius=1), conf.Rule("blk.2.*", radius=0))
    mixed, h = q("rules-r", "Q4_0", hooks=Hooks(True, radius=3, rules=rules))
    by_radius = {r: _tensor_bytes(q(f"r{r}-global", "Q4_0", hooks=Hooks(True, radius=r))[0]) for r in (1, 2, 3)}
    by_radius[0] = _tensor_bytes(q("off-Q4_0", "Q4_0", hist=False)[0])
    got = _tensor_bytes(mixed)
    doc = _check_hist_matches_file(mixed, h)
    applied = {e["name"]: e.get("rule") for e in doc["tensors"]}
    seen = set()
    for name, data in got.items():
        k = conf.rule_for(rules, name)
        assert applied[name] == k, name  # the C reader's match equals the Python one
        radius = 3 if k is None else rules[k].radius
        assert data == by_radius[radius][name], (name, radius)
        seen.add(radius)
    assert seen == {0, 1, 2, 3}  # every rule and the default changed something
    assert [r["pattern"] for r in doc["config"]["rules"]] == [r.pattern for r in rules]
    assert doc["config"]["q4_0_radius"] == 3


def test_a_table_rule_gives_some_q8_0_tensors_a_table(q):
    """A table for the attention tensors only: those store the table's levels, the others are stock
    Q8_0, and the model totals count the two apart (by code and by value)."""
    t = conf.load_table(TABLES / "basic.table")
    mixed, h = q("rules-t", "Q8_0", hooks=Hooks(True, rules=(conf.Rule("*attn*", table_set=True, table=t),)))
    stock = _tensor_bytes(q("off-Q8_0", "Q8_0", hist=False)[0])
    table = _tensor_bytes(q("table-basic", "Q8_0", hooks=Hooks(True, table=t))[0])
    got = _tensor_bytes(mixed)
    attn = {n for n in got if "attn" in n}
    assert attn and attn != set(got)
    for name, data in got.items():
        assert data == (table if name in attn else stock)[name], name
    doc = json.loads(Path(h).read_text())
    assert doc["model"]["q8_0 codes"]["bins"] == "code" and doc["model"]["q8_0"]["bins"] == "value"
    by_code = {e["name"] for e in doc["tensors"] if e.get("bins") == "code"}
    assert by_code == {e["name"] for e in doc["tensors"] if e["name"] in attn and e["type"] == "q8_0"}
