"""Measurements made in Python from GGUF files: on small crafted tensors with hand-computed
answers, and against the hooks' own histograms on the demo model."""

import json
import math
import tracemalloc

import gguf
import numpy as np
import pytest

from orchestrator.hooks.conf import Hooks
from orchestrator.study import analysis, stats

T = gguf.GGMLQuantizationType


def q4_0_bytes(rows, scale=1.0):
    """Raw Q4_0 rows from centred values (logical order), 32 per block."""
    out = []
    for vals in rows:
        row = b""
        for i in range(0, len(vals), 32):
            v = np.array(vals[i:i + 32]) + 8
            qs = (v[:16] | (v[16:] << 4)).astype(np.uint8)
            row += np.float16(scale).tobytes() + qs.tobytes()
        out.append(np.frombuffer(row, dtype=np.uint8))
    return np.stack(out)


def q8_0_bytes(rows, scale=1.0):
    out = []
    for vals in rows:
        row = b""
        for i in range(0, len(vals), 32):
            row += np.float16(scale).tobytes() + np.array(vals[i:i + 32], dtype=np.int8).tobytes()
        out.append(np.frombuffer(row, dtype=np.uint8))
    return np.stack(out)


def write_gguf(path, tensors, meta: dict | None = None):
    """A GGUF file with these tensors and string metadata (key -> value)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (meta or {}).items():
        w.add_string(key, value)
    for name, data, dtype in tensors:
        if dtype in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


ROW0 = [0] * 5 + [1] * 10 + [0] + [-8] * 16   # zero runs of 5 and 1
ROW1 = [0] * 32                              # one run of 32 (>= 16)
Q8ROW = [0, 0, 7, 0, 127, -127] + [3] * 26   # zero runs of 2 and 1


@pytest.fixture
def crafted(tmp_path):
    return write_gguf(tmp_path / "crafted.gguf", [
        ("blk.0.attn_q.weight", q4_0_bytes([ROW0, ROW1]), T.Q4_0),
        ("blk.0.ffn_up.weight", q8_0_bytes([Q8ROW]), T.Q8_0),
        ("output_norm.weight", np.ones(32, dtype=np.float32), T.F32),
    ])


def test_crafted_q4_0_by_hand(crafted):
    t = {t.name: t for t in analysis.open_model(crafted).tensors}["blk.0.attn_q.weight"]
    counts, bin_min = stats.value_counts(t)
    assert bin_min == -8
    expect = np.zeros(16, dtype=int)
    expect[0 + 8], expect[1 + 8], expect[-8 + 8] = 38, 10, 16
    assert counts.tolist() == expect.tolist()
    h = analysis.tensor_hist(t)
    runs = [0] * 16
    runs[0], runs[4], runs[15] = 1, 1, 1  # runs of 1, 5 and >= 16
    assert h.zero_runs.tolist() == runs and h.values.tolist() == expect.tolist()
    assert h.long_run_pieces == 2  # the run of 32: two pieces of 16
    p = [38 / 64, 10 / 64, 16 / 64]
    assert stats.entropy_bits(counts) == pytest.approx(-sum(x * math.log2(x) for x in p))
    # 26 literals of 1 + 4 bits; runs 5, 1 (one token each) and 32 (two tokens) of 1 + 4 bits
    assert stats.rle_bits(t) == 26 * 5 + 4 * 5


def test_crafted_q8_0_and_whole_file(crafted):
    t = {t.name: t for t in analysis.open_model(crafted).tensors}["blk.0.ffn_up.weight"]
    counts, bin_min = stats.value_counts(t)
    assert bin_min == -128
    assert {v + bin_min: int(c) for v, c in enumerate(counts) if c} == {0: 3, 7: 1, 127: 1, -127: 1, 3: 26}
    assert stats.rle_bits(t) == 29 * 9 + 2 * 5
    c = stats.recount(crafted, "Q8_0")
    assert c["rle_bpw"] == (29 * 9 + 2 * 5) / 32
    assert c["entropy_bpw"] == pytest.approx(stats.entropy_bits(counts))


def test_scan_measures_zstd_per_tensor_and_keys_the_content(crafted, tmp_path):
    import zstandard
    reader = analysis.open_model(crafted)
    s = analysis.scan(crafted)
    direct = sum(len(zstandard.ZstdCompressor(level=1).compress(np.asarray(t.data).tobytes())) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    assert s["zstd_sampled"] == 1.0
    assert abs(s["zstd_bpw"] - 8 * direct / elements) <= 8 * 8 * len(reader.tensors) / elements  # frame headers
    # the key follows the tensors' bytes and the metadata the model computes with, not descriptive
    # metadata (names, notes): the same tensors under another name and note key alike
    same = [("blk.0.attn_q.weight", q4_0_bytes([ROW0, ROW1]), T.Q4_0),
            ("blk.0.ffn_up.weight", q8_0_bytes([Q8ROW]), T.Q8_0),
            ("output_norm.weight", np.ones(32, dtype=np.float32), T.F32)]
    renamed = write_gguf(tmp_path / "renamed.gguf", same,
                         {"general.name": "another name", "quantize.imatrix.file": "notes.dat"})
    assert renamed.read_bytes() != crafted.read_bytes()  # (the exclusion is exercised: the files differ)
    assert analysis.scan(renamed)["tensor_key"] == s["tensor_key"]
    computes = write_gguf(tmp_path / "computes.gguf", same, {"llama.rope.scaling.type": "linear"})
    assert analysis.scan(computes)["tensor_key"] != s["tensor_key"]
    changed = write_gguf(tmp_path / "changed.gguf", [
        ("blk.0.attn_q.weight", q4_0_bytes([ROW0, ROW1]), T.Q4_0),
        ("blk.0.ffn_up.weight", q8_0_bytes([Q8ROW[:-1] + [4]]), T.Q8_0),
        ("output_norm.weight", np.ones(32, dtype=np.float32), T.F32),
    ])
    assert analysis.scan(changed)["tensor_key"] != s["tensor_key"]


def test_sampled_zstd_estimates_the_full_measure(q, demo_base):
    """Above the budget, zstd is measured on evenly spaced segments: close to the full figure."""
    for model in (demo_base, q("r2-t2", "Q4_0", hooks=Hooks(True, radius=2), threads=2)[0]):
        full = analysis.scan(model, budget=1 << 40)
        part = analysis.scan(model, budget=8 << 20)
        assert full["zstd_sampled"] == 1.0 and part["zstd_sampled"] < 0.9
        assert part["tensor_key"] == full["tensor_key"]
        assert part["zstd_bpw"] == pytest.approx(full["zstd_bpw"], rel=5e-3), model.name


def test_damage_by_hand(tmp_path):
    base_rows = np.ones((2, 32), dtype=np.float32)
    base_rows[:, 7] = 2.0
    base = write_gguf(tmp_path / "base.gguf", [("blk.3.ffn_up.weight", base_rows, T.F32)])
    quant = write_gguf(tmp_path / "q.gguf", [("blk.3.ffn_up.weight", q8_0_bytes([[2] * 32, [2] * 32], 0.5), T.Q8_0)])
    d = stats.damage(base, quant)
    (row,) = d["tensors"]
    assert (row["layer"], row["kind"]) == (3, "ffn_up")
    # every weight becomes 1.0: error 1 at the two 2.0s; reference sum of squares 2 * (31 + 4)
    assert row["rel_rmse"] == pytest.approx(math.sqrt(2 / 70)) and d["model_rel_rmse"] == row["rel_rmse"]


def test_coded_sizes_from_the_hooks_equal_a_recount_from_the_file(q):
    from orchestrator import paths
    from orchestrator.hooks import conf
    table = conf.load_table(paths.conf_dir() / "tables" / "balanced.table")
    for name, qtype, kw in (("r2-t2", "Q4_0", {"hooks": Hooks(True, radius=2), "threads": 2}),
                            ("r3", "Q4_0", {"hooks": Hooks(True, radius=3)}),
                            ("simple-hist-Q8_0", "Q8_0", {}),
                            ("bal-t2", "Q8_0", {"hooks": Hooks(True, table=table), "threads": 2})):
        model, hist = q(name, qtype, **kw)
        doc = json.loads(hist.read_text())
        if "hooks" not in kw or kw["hooks"].table is None:
            by_name = {e["name"]: e for e in doc["tensors"]}
            for t in analysis.hooked_tensors(analysis.open_model(model)):
                counts, _ = stats.value_counts(t)
                assert counts.tolist() == by_name[t.name]["values"], t.name
        if name == "r3":  # runs of 16 zeros and more occur, so the long-run pieces are exercised
            assert doc["model"]["q4_0"]["long_run_pieces"] > doc["model"]["q4_0"]["zero_runs"][-1] > 0
        assert stats.coded_sizes(doc, qtype) == stats.recount(model, qtype), name


def test_analysis_memory_stays_bounded(q, demo_base):
    model, _ = q("off-Q8_0", "Q8_0", hist=False)
    size = model.stat().st_size
    analysis.open_model(model), analysis.open_model(demo_base)  # the readers' metadata is not what we bound
    tracemalloc.start()
    try:
        stats.recount(model, "Q8_0")
        analysis.scan(model)
        stats.damage(demo_base, model)
        for t in analysis.hooked_tensors(analysis.open_model(model)):
            analysis.tensor_hist(t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = 64 << 20  # fixed by the slab size, whatever the model size
    assert size > 100 << 20 and peak < bound, f"peak {peak / 2**20:.0f} MiB reading a {size / 2**20:.0f} MiB file"


def test_reader_keeps_every_field_byte_of_gguf_s_own_reader(demo_base, tmp_path):
    """Our fast reader keeps array fields raw: the same fields at the same offsets with the same bytes
    (so tensor keys are unchanged), the same tensors, the arrays' lengths; decoding a raw array is a
    clear error, not a wrong answer. Also on a written file with every kind of array."""
    w = gguf.GGUFWriter(tmp_path / "arrays.gguf", "llama")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strings", ["a", "", "ünïcode"])
    w.add_array("t.empty", [])
    w.add_string("t.s", "text")
    w.add_tensor("x", np.arange(8, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    for path in (demo_base, tmp_path / "arrays.gguf"):
        ours, theirs = analysis._Reader(path), gguf.GGUFReader(path)
        assert [(f.name, f.offset) for f in ours.fields.values()] == [(f.name, f.offset) for f in theirs.fields.values()]
        for a, b in zip(ours.fields.values(), theirs.fields.values()):
            assert b"".join(p.tobytes() for p in a.parts) == b"".join(p.tobytes() for p in b.parts), a.name
            if b.types[0] == gguf.GGUFValueType.ARRAY:
                assert isinstance(a, analysis.RawArray) and analysis.array_length(a) == len(b.data)
                with pytest.raises(analysis.OrchestrateError, match="kept raw"):
                    a.contents()
            else:
                assert a.contents() == b.contents()
        assert [(t.name, t.tensor_type, list(t.shape), t.data_offset, t.n_bytes) for t in ours.tensors] == \
               [(t.name, t.tensor_type, list(t.shape), t.data_offset, t.n_bytes) for t in theirs.tensors]
    assert analysis.array_length(analysis._Reader(tmp_path / "arrays.gguf").get_field("t.strings")) == 3


def test_code_bits_of_a_table_variant():
    from orchestrator.study.stats import code_bits
    a, b = list(range(-8, 8)), list(range(-16, 16, 2))
    hist = {"config": {"table": None, "rules": [{"table": {"level": a}}, {"table": {"level": b}}, {"table": {"level": a}}]},
            "tensors": [{"bins": "code", "rule": 0, "elements": 3200}, {"bins": "code", "rule": 1, "elements": 3200},
                        {"bins": "code", "rule": 2, "elements": 1600}, {"bins": "value", "elements": 1000}]}
    elements = 9000  # 8000 coded Q8_0 weights, 1000 others
    got = code_bits(hist, 8.0, elements)
    assert got["table_bpw"] == 2 * 128 / elements  # two distinct tables
    assert got["code_bpw"] == 8.0 - 4 * 8000 / elements + got["table_bpw"]  # coded blocks at 4.5 instead of 8.5
    assert code_bits({"config": {}, "tensors": [{"bins": "value", "elements": 5}]}, 8.0, 5) == {"table_bpw": None,
                                                                                              "code_bpw": None}
