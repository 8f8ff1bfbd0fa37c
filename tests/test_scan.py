"""Per-tensor sensitivity scans: groups, a group's model assembled from two quantizations, and the
scan on the demo (real llama-quantize and llama-perplexity runs)."""

import filecmp
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import orchestrate
from orchestrator.errors import OrchestrateError
from orchestrator.hooks import conf
from orchestrator.hooks.conf import Hooks
from orchestrator.proc import clean_env
from orchestrator.study import groups, scores

TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"


@pytest.mark.parametrize("qtype, hooks, by, pick", [
    ("Q4_0", Hooks(True, radius=1), "layer", "blk.1"),
    ("Q8_0", Hooks(True, table=conf.load_table(TABLES / "balanced.table")), "kind", "attn_q"),
])
def test_a_groups_assembled_model_is_what_its_rules_quantize(q, tmp_path, qtype, hooks, by, pick):
    """R's file with group g's tensors taken from E's file is byte for byte the base quantized with E's
    setting as a rule for g's tensors."""
    ref, ref_h = q(f"simple-hist-{qtype}", qtype)
    enc, _ = q(f"enc-{qtype}", qtype, hooks=hooks)
    changed = groups.changed_tensors(ref, enc)
    assert changed and len(changed) < len(json.loads(Path(ref_h).read_text())["tensors"])
    g = next(g for g in groups.make_groups(changed, by) if g.name == pick)
    model = groups.assemble(ref, enc, g.tensors, tmp_path / "g.gguf")
    setting = {"radius": hooks.radius} if hooks.table is None else {"table_set": True, "table": hooks.table}
    rules = tuple(conf.Rule(groups.rule_pattern(t), **setting) for t in g.tensors)
    ruled, _ = q(f"rules-{pick}", qtype, hooks=Hooks(True, rules=rules))
    assert filecmp.cmp(model, ruled, shallow=False)
    assert not list(tmp_path.glob(".*partial"))


def test_files_of_different_layouts_are_refused(q, tmp_path):
    a, _ = q("simple-hist-Q4_0", "Q4_0")
    b, _ = q("simple-hist-Q8_0", "Q8_0")
    with pytest.raises(OrchestrateError, match="do not have the same layout"):
        groups.assemble(a, b, ("blk.0.attn_q.weight",), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_groups_by_kind_layer_and_tensor():
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.10.attn_q.weight",
             "blk.2.attn_q.weight", "output.weight"]
    by_kind = {g.name: g.tensors for g in groups.make_groups(names, "kind")}
    assert by_kind["attn_q"] == ("blk.0.attn_q.weight", "blk.10.attn_q.weight", "blk.2.attn_q.weight")
    assert [g.name for g in groups.make_groups(names, "layer")] == ["blk.0", "blk.2", "blk.10", "output", "token_embd"]
    lk = groups.make_groups(names, "layer-kind")
    assert [(g.layer, g.kind) for g in lk][:3] == [(0, "attn_q"), (0, "ffn_down"), (2, "attn_q")]
    assert sorted(t for g in groups.make_groups(names, "tensor") for t in g.tensors) == sorted(names)
    with pytest.raises(OrchestrateError, match="bad grouping"):
        groups.make_groups(names, "row")
    with pytest.raises(OrchestrateError, match="cannot be written as a rule"):
        groups.rule_pattern("blk.*.x")


def test_screening_skips_the_groups_inside_a_whole_decided_below():
    from orchestrator.study.scan import Effect, GroupResult, screened
    names = [f"blk.{i}.{k}.weight" for i in range(3) for k in ("attn_q", "ffn_up")] + ["output.weight"]
    cells = groups.make_groups(names, "layer-kind")

    def result(g, verdict, hi):
        return GroupResult(g, 16, verdict, {"kld": Effect(hi / 2, 0.0, hi)}, 0.0, "", {})
    layers = {g.name: g for g in groups.make_groups(names, "layer")}
    kinds = {g.name: g for g in groups.make_groups(names, "kind")}
    parents = [result(layers["blk.0"], "below", 0.04), result(layers["blk.1"], "above", 0.2),
               result(layers["blk.2"], "undecided", 0.06), result(kinds["attn_q"], "below", 0.03),
               result(kinds["ffn_up"], "above", 0.3), result(layers["output"], "below", 0.01)]
    out = screened(cells, parents)
    # blk.0's cells by their layer (attn_q: by the kind too, whose bound is lower); attn_q everywhere
    assert {n: p.group.name for n, p in out.items()} == {"blk.0.attn_q": "attn_q", "blk.0.ffn_up": "blk.0",
                                                         "blk.1.attn_q": "attn_q", "blk.2.attn_q": "attn_q"}
    # a group that is its whole (output: the same tensors) is never screened by itself: it was scored
    assert "output" not in out


# ---- llama-perplexity's window (patch 0007) and the scan on the demo --------------------------

def _perplexity(fork, model, text, out, chunks_env=None, extra=()):
    env = {**clean_env(), "PABLO_SCORES": str(out), **({"PABLO_CHUNKS": chunks_env} if chunks_env else {})}
    return subprocess.run([str(fork.binary("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "512",
                           "--chunks", "8", "-t", "2", *extra], env=env, capture_output=True, text=True)


def test_a_window_scores_what_a_full_run_scores(fork, q, demo_base, demo_text, tmp_path):
    """PABLO_CHUNKS=4:8 (a whole batch of 4 chunks at -c 512) gives the per-token scores of chunks 4..7
    of a run over 0..7, in perplexity and KL-divergence modes; a window outside is an error."""
    model, _ = q("simple-hist-Q4_0", "Q4_0")
    logits = tmp_path / "base.logits"
    res = subprocess.run([str(fork.binary("llama-perplexity")), "-m", str(demo_base), "-f", str(demo_text), "-c",
                          "512", "--chunks", "8", "-t", "2", "--kl-divergence-base", str(logits)],
                         env=clean_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for mode, extra in (("ppl", ()), ("kld", ("--kl-divergence-base", str(logits), "--kl-divergence"))):
        full, part = tmp_path / f"{mode}-full.bin", tmp_path / f"{mode}-part.bin"
        assert _perplexity(fork, model, demo_text, full, extra=extra).returncode == 0
        res = _perplexity(fork, model, demo_text, part, "4:8", extra)
        assert res.returncode == 0 and "scoring chunks 4..7 of 8" in res.stderr, res.stderr
        a, b = scores.read(full), scores.read(part)
        assert b.n_chunk == 4 and set(a.arrays) == set(b.arrays) == ({"nll", "kld", "top"} if mode == "kld" else {"nll"})
        for name in a.arrays:
            assert np.array_equal(a.arrays[name][4:8], b.arrays[name]), (mode, name)
    bad = _perplexity(fork, model, demo_text, tmp_path / "bad.bin", "6:9")
    assert bad.returncode == 1 and "PABLO_CHUNKS=6:9 is not a window" in bad.stderr
    assert not (tmp_path / "bad.bin").exists()


def _rounds(out: Path) -> list[Path]:
    doc = json.loads((out / "scan.json").read_text())
    return sorted(p for g in doc["groups"] for p in Path(g["scan_dir"]).glob("chunks-*.bin"))


@pytest.fixture(scope="module")
def kind_scan(fork, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "by-kind"
    res = orchestrate("scan", "--radius", "1", "--by", "kind", "--ctx", "256", "--chunks", "32",
                      "--threshold", "0.05", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def _check_figure(path: Path):
    from PIL import Image  # matplotlib's own dependency
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 200


def test_scan_by_kind_of_radius_1_on_the_demo(kind_scan):
    out, res = kind_scan
    doc = json.loads((out / "scan.json").read_text())
    kinds = {g["name"] for g in doc["groups"]}
    assert kinds == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    looks = doc["settings"]["looks"]
    assert looks == [8, 16, 32]  # 2048 // 256 = 8 chunks a batch
    for g in doc["groups"]:
        e = g["effects"]["kld"]
        assert g["chunks"] in looks and e["lo"] <= e["mean"] <= e["hi"]
        decided = e["lo"] > 0.05 or e["hi"] < 0.05
        assert decided == (g["verdict"] in ("above", "below")), g  # stopped early only when decided
        assert g["verdict"] != "more" and (decided or g["chunks"] == 32)
    for f in ("scan_heatmap.png", "scan_ranked.png"):
        _check_figure(out / f)
    table = (out / "scan.md").read_text()
    assert "Chunks scored:" in table and all(k in table for k in kinds)
    assert (out / "scan.csv").read_text().splitlines()[0].startswith("rank,group,layer,kind")


def test_a_scan_run_again_scores_nothing_and_keeps_every_round(kind_scan):
    out, _ = kind_scan
    before = {p: p.stat().st_mtime_ns for p in _rounds(out)}
    res = orchestrate("scan", "--radius", "1", "--by", "kind", "--ctx", "256", "--chunks", "32",
                      "--threshold", "0.05", "--out", out)
    assert res.returncode == 0, res.stderr
    assert ": chunks " not in res.stderr  # no round scored
    # another threshold: the rounds already scored are read, never scored again
    res = orchestrate("scan", "--radius", "1", "--by", "kind", "--ctx", "256", "--chunks", "32",
                      "--threshold", "0.5", "--out", out)
    assert res.returncode == 0, res.stderr
    for p, t in before.items():
        assert p.stat().st_mtime_ns == t, p


def test_a_groups_scores_are_those_of_the_model_its_rules_quantize(kind_scan, q, fork, demo_text, tmp_path):
    """Same tensors, same scores: the base quantized with radius 1 as a rule for attn_k's tensors only,
    scored on the scan's first round of chunks, gives the group's per-token scores exactly."""
    out, _ = kind_scan
    doc = json.loads((out / "scan.json").read_text())
    g = next(g for g in doc["groups"] if g["name"] == "attn_k")
    rules = tuple(conf.Rule(groups.rule_pattern(t), radius=1) for t in g["tensors"])
    model, _ = q("rules-attn_k", "Q4_0", hooks=Hooks(True, rules=rules))
    kept = scores.read(Path(g["scan_dir"]) / "chunks-0-8.bin")
    mine = tmp_path / "mine.bin"
    res = subprocess.run([str(fork.binary("llama-perplexity")), "-m", str(model), "-f", str(demo_text), "-c", "256",
                          "-t", "2", "--kl-divergence-base", doc["base"]["logits"], "--kl-divergence"],
                         env={**clean_env(), "PABLO_SCORES": str(mine), "PABLO_CHUNKS": "0:8"},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = scores.read(mine)
    assert set(got.arrays) == set(kept.arrays) == {"nll", "kld", "top"}
    for name in got.arrays:
        assert np.array_equal(got.arrays[name], kept.arrays[name]), name


def test_scan_by_layer_of_radius_1_on_the_demo(fork, tmp_path):
    """Every layer a group (a fixed schedule: one look of 8 chunks, no threshold); the heat-map has a
    row per layer."""
    out = tmp_path / "by-layer"
    res = orchestrate("scan", "--radius", "1", "--by", "layer", "--ctx", "256", "--chunks", "8", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads((out / "scan.json").read_text())
    assert [g["name"] for g in doc["groups"]] == [f"blk.{i}" for i in range(30)]
    assert all(g["chunks"] == 8 and g["verdict"] == "all chunks" for g in doc["groups"])
    assert all(len(g["tensors"]) == 7 for g in doc["groups"])  # q, k, v, output, gate, up, down
    _check_figure(out / "scan_heatmap.png")
    assert "Chunks scored: 240 of the 240" in (out / "scan.md").read_text()


def test_a_screened_scan_by_layer_and_kind_on_the_demo(fork, tmp_path):
    out = tmp_path / "screened"
    res = orchestrate("scan", "--radius", "1", "--by", "layer-kind", "--screen", "--threshold", "0.05", "--ctx", "128",
                      "--chunks", "16", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "scan.json").read_text())
    screen = doc["screen"]
    parents = {g["name"]: g for g in screen["parents"]}
    assert len(parents) == 30 + 7 and len(doc["groups"]) + len(screen["screened"]) == 30 * 7
    assert screen["screened"] and "screened out" in res.stdout
    for g in screen["screened"]:  # each inside a layer or kind decided below, bounded by its interval
        p = parents[g["by"]]
        assert p["verdict"] == "below" and set(g["tensors"]) < set(p["tensors"]) and g["below"] == p["effects"]["kld"]["hi"]
    for g in doc["groups"]:  # each scored group: neither its layer nor its kind was decided below
        assert all(parents[n]["verdict"] != "below" for n in (f"blk.{g['layer']}", g["kind"])), g["name"]
    md = (out / "scan.md").read_text()
    assert "Screened (`--screen`)" in md and "| blk.0 | 7 |" in md
    assert (out / "scan.csv").read_text().count(",screened by ") == len(screen["screened"])
    _check_figure(out / "scan_heatmap.png")
    # a recipe needs every group's own effect
    res = orchestrate("recipe", out, "--budget", "kld=0.1", "--text", tmp_path / "x.txt", "--out", tmp_path / "r")
    assert res.returncode == 1 and "was screened" in res.stderr and not (tmp_path / "r").exists()


def test_scan_refuses_what_it_cannot_do(fork, tmp_path):
    res = orchestrate("scan", "--out", tmp_path / "x")
    assert res.returncode != 0 and "give the encoding to scan" in res.stderr and "Traceback" not in res.stderr
    res = orchestrate("scan", "--radius", "1", "--table", "basic", "--out", tmp_path / "x")
    assert res.returncode != 0 and "give the encoding to scan" in res.stderr
    res = orchestrate("scan", "--radius", "1", "--by", "kind", "--screen", "--threshold", "0.1", "--out", tmp_path / "x")
    assert res.returncode == 1 and "--screen needs --threshold and --by layer-kind" in res.stderr
    res = orchestrate("scan", "--radius", "1", "--by", "layer-kind", "--screen", "--out", tmp_path / "x")
    assert res.returncode == 1 and "--screen needs --threshold" in res.stderr
    res = orchestrate("scan", "--radius", "1", "--by", "row", "--out", tmp_path / "x")
    assert res.returncode == 2 and "row" in res.stderr


def test_scan_plan_counts_groups_and_chunks_without_scoring(fork, demo_base, tmp_path):
    res = orchestrate("scan", "--radius", "1", "--by", "kind", "--ctx", "256", "--chunks", "32", "--plan",
                      "--out", tmp_path / "x")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("scan: 7 groups by kind of the 210 Q4_0 tensors; looks after 8, 16, 32 chunks; "
                           "at most 224 chunks in all"), line
    assert not (tmp_path / "x").exists()


def test_a_type_file_gives_exactly_the_groups_tensors_their_type(fork, demo_base, q, tmp_path):
    """A type scan's group model: the reference type, with the group's tensors given E's type through
    llama-quantize's --tensor-type-file (patterns that match one whole name each)."""
    from orchestrator.tools.quantize import run_quantize
    ref, _ = q("simple-hist-Q8_0", "Q8_0")
    ref_types = groups.tensor_types(ref)
    g = next(g for g in groups.make_groups([n for n, t in ref_types.items() if t == "q8_0"], "layer-kind")
             if g.name == "blk.1.attn_q")
    f = groups.type_file(g.tensors, {t: "q4_0" for t in g.tensors}, tmp_path / "types.txt")
    out = tmp_path / "g.gguf"
    run_quantize(fork, demo_base, out, "Q8_0", extra=["--tensor-type-file", str(f)], progress=False)
    got = groups.tensor_types(out)
    assert {n for n in got if got[n] != ref_types[n]} == {"blk.1.attn_q.weight"}  # not blk.11, blk.12, ...
    assert got["blk.1.attn_q.weight"] == "q4_0"


def test_type_scan_by_kind_on_the_demo(fork, tmp_path):
    out = tmp_path / "type-scan"
    res = orchestrate("scan", "--type", "Q4_0", "--reference", "Q8_0", "--by", "kind", "--ctx", "256",
                      "--chunks", "8", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads((out / "scan.json").read_text())
    assert {g["name"] for g in doc["groups"]} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                  "ffn_up", "ffn_down"}
    assert doc["reference"]["name"] == "q8_0" and doc["encoding"]["name"] == "q4_0"
    assert all(g["effects"]["kld"]["mean"] > 0 for g in doc["groups"])  # 4 bits hurt more than 8, every kind
    _check_figure(out / "scan_heatmap.png")
    res = orchestrate("scan", "--type", "Q8_0", "--out", tmp_path / "y")
    assert res.returncode == 1 and "is the reference itself" in res.stderr


def _scan_doc() -> dict:
    """A small scan document of the shape `orchestrate scan` writes (two groups of 4 chunks)."""
    from orchestrator import scans

    def group(name, k):
        return {"name": name, "layer": None, "kind": name, "tensors": [f"blk.0.{name}.weight"], "chunks": 4,
                "verdict": "all chunks", "seconds": 1.0, "scan_dir": "/x",
                "effects": {q: {"mean": k, "lo": k / 2, "hi": 2 * k} for q in scans.QUANTITIES},
                "per_chunk": {q: [k] * 4 for q in scans.QUANTITIES}}
    rows = [{"name": n, "run_dir": f"/runs/{n}"} for n in ("base", "q4_0", "q4_0-r1")]
    return {"schema": scans.SCHEMA, "settings": {"by": "kind"}, "encoding": {"name": "q4_0-r1"},
            "reference": {"name": "q4_0", "type": "Q4_0"}, "base": {"path": "/m.gguf", "sha256": "ab"},
            "text": "/t.txt", "text_sha256": "cd", "fork": "f", "variants": rows,
            "groups": [group("attn_q", 0.01), group("ffn_up", 0.02)]}


def _set(path, value):
    def change(doc):
        *keys, last = path
        for k in keys:
            doc = doc[k]
        doc[last] = value
    return change


@pytest.mark.parametrize("change, says", [
    (_set(["groups"], {"a": 1}), "`groups` is not a list"),
    (_set(["variants"], []), "`variants` is not the base's, R's and E's rows"),
    (_set(["groups", 0, "tensors"], "blk.0.attn_q.weight"), "group attn_q: `tensors` is not a list of tensor names"),
    (_set(["groups", 1, "chunks"], True), "group ffn_up: `chunks` is not a count"),
    (_set(["groups", 0, "effects"], {"kld": {"lo": 1}}), "group attn_q: its kld effect is not a finite mean"),
    (_set(["groups", 0, "effects", "nll", "mean"], float("nan")), "group attn_q: its nll effect is not a finite mean"),
    (_set(["groups", 1, "per_chunk", "kld"], [0.1, 0.2]), "group ffn_up: its per-chunk kld differences are not 4 finite"),
    (_set(["groups", 1, "per_chunk", "nll"], [0.1, 0.2, float("inf"), 0.3]), "its per-chunk nll differences are not 4"),
    (_set(["groups", 0], ["attn_q"]), "group 1 has no name"),
])
def test_a_damaged_scan_document_is_refused_in_one_line(tmp_path, change, says):
    from orchestrator import scans
    good = _scan_doc()
    (tmp_path / "good").mkdir()
    scans.write(tmp_path / "good", good)
    assert scans.load(tmp_path / "good")["groups"] == good["groups"]
    bad = _scan_doc()
    change(bad)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / scans.FILE).write_text(json.dumps(bad))  # (NaN and Infinity as Python's json writes them)
    before = (tmp_path / "bad" / scans.FILE).read_bytes()
    with pytest.raises(OrchestrateError, match="damaged") as e:
        scans.load(tmp_path / "bad")
    assert says in str(e.value) and "\n" not in str(e.value)
    res = orchestrate("recipe", tmp_path / "bad", "--budget", "kld=0.05", "--out", tmp_path / "rec")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and says in res.stderr, res.stderr
    assert (tmp_path / "bad" / scans.FILE).read_bytes() == before and not (tmp_path / "rec").exists()
