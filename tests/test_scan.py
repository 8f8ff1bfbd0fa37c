"""Per-tensor sensitivity scans: groups, a group's model assembled from two quantizations, and the
scan on the demo (real llama-quantize and llama-perplexity runs)."""

import filecmp
import json
from pathlib import Path

import pytest

from orchestrator.errors import OrchestrateError
from orchestrator.hooks import conf
from orchestrator.hooks.conf import Hooks
from orchestrator.study import groups

TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"


def _without_rule(entries):
    return [{k: v for k, v in e.items() if k != "rule"} for e in entries]


@pytest.mark.parametrize("qtype, hooks, by, pick", [
    ("Q4_0", Hooks(True, radius=1), "layer", "blk.1"),
    ("Q8_0", Hooks(True, table=conf.load_table(TABLES / "balanced.table")), "kind", "attn_q"),
])
def test_a_groups_assembled_model_is_what_its_rules_quantize(q, tmp_path, qtype, hooks, by, pick):
    """R's file with group g's tensors taken from E's file is byte for byte the base quantized with E's
    setting as a rule for g's tensors; its histograms are the ones that quantization writes."""
    ref, ref_h = q(f"simple-hist-{qtype}", qtype)
    enc, enc_h = q(f"enc-{qtype}", qtype, hooks=hooks)
    changed = groups.changed_tensors(ref, enc)
    assert changed and len(changed) < len(json.loads(Path(ref_h).read_text())["tensors"])
    g = next(g for g in groups.make_groups(changed, by) if g.name == pick)
    model = groups.assemble(ref, enc, g.tensors, tmp_path / "g.gguf")
    hist = groups.assemble_hist(ref_h, enc_h, g.tensors, tmp_path / "g.json")
    setting = {"radius": hooks.radius} if hooks.table is None else {"table_set": True, "table": hooks.table}
    rules = tuple(conf.Rule(groups.rule_pattern(t), **setting) for t in g.tensors)
    ruled, ruled_h = q(f"rules-{pick}", qtype, hooks=Hooks(True, rules=rules))
    assert filecmp.cmp(model, ruled, shallow=False)
    a, b = json.loads(hist.read_text()), json.loads(Path(ruled_h).read_text())
    assert _without_rule(a["tensors"]) == _without_rule(b["tensors"])
    assert a["model"] == b["model"]
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
