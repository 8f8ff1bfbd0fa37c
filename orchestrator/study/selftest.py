"""The canary: does a built fork's hooks still do their job? (`orchestrate selftest`, and the
last step of `orchestrate upstream bump`.)

A patch can still apply after an upstream change and no longer work (a hook moved off the
offline quantization path by a refactor). On a base model (the demo's by default) this
quantizes a few times, reads the files back and checks, naming the check that fails:
hooks off gives the same bytes as MODE=simple; a radius zeroes exactly the small Q4_0 values
and nothing else; a table stores exactly level[code(q)] of each stock Q8_0 value; the
histograms equal an independent recount from the written file.
"""

import tempfile
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import OrchestrateError
from ..files import read_json
from ..fork.build import Fork
from ..hooks.conf import load_table
from ..hooks.conf import Hooks
from ..tools.quantize import run_quantize
from . import analysis

RADIUS = 2


class CanaryFailed(OrchestrateError):
    pass


def _values(path: Path) -> dict:
    """name -> (scales as uint16 bits, values) of every Q4_0/Q8_0 tensor."""
    out = {}
    for t in analysis.hooked_tensors(analysis.open_model(path)):
        scales, vals = analysis.decode(t, analysis.blocks(t))
        out[t.name] = (t.tensor_type, scales.view(np.uint16).copy(), vals.copy())
    analysis.release(path)
    return out


def _recount_matches(model: Path, hist_json: Path, codes_of=None) -> bool:
    doc = read_json(hist_json)
    by_name = {e["name"]: e for e in doc["tensors"]}
    reader = analysis.open_model(model)
    try:
        for t in analysis.hooked_tensors(reader):
            h = analysis.tensor_hist(t, codes_of if t.tensor_type == analysis.Q8_0 else None)
            e = by_name.get(t.name)
            if not e or e["values"] != h.values.tolist() or e["zero_runs"] != h.zero_runs.tolist() \
                    or e["long_run_pieces"] != h.long_run_pieces:
                return False
        return True
    finally:
        del reader
        analysis.release(model)


def run(fork: Fork, base: Path, threads: int | None = None) -> list[str]:
    """Every check in turn; returns their names, raises CanaryFailed naming the first that fails
    (a check whose quantization itself fails has failed too)."""
    table = load_table(paths.conf_dir() / "tables" / "balanced.table", "balanced")
    codes_of = np.zeros(256, dtype=np.int64)
    for c, lev in enumerate(table.level):
        codes_of[lev + 128] = c
    with tempfile.TemporaryDirectory(prefix="orchestrate-selftest-") as tmp:
        d = Path(tmp)

        def q(name, qtype, **kw):
            run_quantize(fork, base, d / f"{name}.gguf", qtype, threads=threads, progress=False,
                         log_path=d / f"{name}.log", **kw)
            return d / f"{name}.gguf"

        def simple_is_stock():
            return q("off", "Q4_0").read_bytes() == q("simple", "Q4_0", hist=d / "simple.json").read_bytes()

        def radius_zeroes_small_values():
            stock = _values(d / "off.gguf")
            zeroed = _values(q("radius", "Q4_0", hooks=Hooks(True, radius=RADIUS), hist=d / "radius.json"))
            ok, changed = bool(stock) and stock.keys() == zeroed.keys(), 0
            for name, (typ, s0, v0) in stock.items():
                _, s1, v1 = zeroed[name]
                small = (np.abs(v0) <= RADIUS) & (v0 != 0) if typ == analysis.Q4_0 else np.zeros_like(v0, dtype=bool)
                ok &= np.array_equal(s0, s1) and bool(np.all(v1[small] == 0)) and np.array_equal(v1[~small], v0[~small])
                changed += int(small.sum())
            return ok and changed > 0

        def table_stores_levels():
            stock = _values(q("q8", "Q8_0"))
            coded = _values(q("table", "Q8_0", hooks=Hooks(True, table=table), hist=d / "table.json"))
            ok = bool(stock) and stock.keys() == coded.keys()
            for name, (_, s0, v0) in stock.items():
                _, s1, v1 = coded[name]
                ok &= np.array_equal(s0, s1) and np.array_equal(v1, table.translate(v0))
            return ok

        def histograms_recount():
            return (_recount_matches(d / "simple.gguf", d / "simple.json")
                    and _recount_matches(d / "radius.gguf", d / "radius.json")
                    and _recount_matches(d / "table.gguf", d / "table.json", codes_of))

        checks = [("hooks off and MODE=simple write the same bytes", simple_is_stock),
                  (f"radius {RADIUS} zeroes exactly the Q4_0 values with |v| <= {RADIUS}", radius_zeroes_small_values),
                  ("the balanced table stores level[code(q)] for every Q8_0 value", table_stores_levels),
                  ("histograms equal a recount from the written files", histograms_recount)]
        for name, check in checks:
            try:
                ok = check()
            except OrchestrateError as e:
                raise CanaryFailed(f"selftest failed: {name} ({e}) (fork {fork.id})") from None
            if not ok:
                raise CanaryFailed(f"selftest failed: {name} (fork {fork.id})")
    return [name for name, _ in checks]
