"""A recipe: which groups of tensors take a scan's encoding, for the most gain under a budget on the
predicted damage — and the check of that prediction on text the scan never saw.

The choice assumes that the groups' effects add up (as Thireus's quant_assign does, and never checks):
each group's effect is what the scan measured for that group alone against the reference, and the
recipe's predicted effect is their sum. Maximising the gain (zeros added) under "sum of effects <=
budget" is a 0/1 knapsack, solved by dynamic programming over costs rounded up to 1/RESOLUTION of the
budget: the chosen set never breaks the budget on the scan's own figures, and it is optimal up to that
rounding. The predicted interval combines the groups' half-widths in quadrature, which assumes their
errors independent (tests/test_recipe.py simulates it: coverage 0.99 for independent groups, 0.95 at a
correlation of 0.5, but 0.87 at 0.8 and 0.82 at 0.95 — groups scored on the same chunks can be that
correlated); the measurement on held-out text is the real check, and what tells whether the additive
model held (called failed, when it held, 0.2-1.5% of the time in the same simulation).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OrchestrateError
from ..files import read_json
from . import analysis, groups, stats

RESOLUTION = 2000   # budget steps of the knapsack
QUANTITIES = {"kld": "mean KLD", "nll": "ln(PPL ratio)"}


@dataclass(frozen=True)
class Option:
    """A scan group: what taking the encoding on it costs (its effect on `quantity`, with interval) and
    gains (zeros added to the model)."""
    group: str
    tensors: tuple[str, ...]
    cost: float
    lo: float | None
    hi: float | None
    gain: int


@dataclass(frozen=True)
class Budget:
    quantity: str      # kld | nll
    limit: float

    @property
    def label(self) -> str:
        return f"{self.quantity}<={self.limit:g}"


def parse_budgets(text: str) -> list[Budget]:
    """`kld=0.02,0.05` or `nll=0.01`: one quantity, one or more limits (ascending)."""
    quantity, sep, limits = text.partition("=")
    if not sep or quantity not in QUANTITIES:
        raise OrchestrateError(f"budget {text!r}: give QUANTITY=LIMIT[,LIMIT...] with QUANTITY one of "
                               f"{', '.join(QUANTITIES)} (e.g. kld=0.05)")
    try:
        values = sorted({float(x) for x in limits.split(",")})
    except ValueError:
        raise OrchestrateError(f"budget {text!r}: the limits must be numbers") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise OrchestrateError(f"budget {text!r}: limits must be positive numbers")
    return [Budget(quantity, v) for v in values]


def choose(options: list[Option], budget: float) -> list[Option]:
    """The options of most total gain whose costs sum to at most budget (costs rounded up to the
    budget's 1/RESOLUTION; options that cost nothing or less are always taken when they gain)."""
    free = [o for o in options if o.cost <= 0 and o.gain > 0]
    spent = sum(o.cost for o in free)   # (<= 0: it loosens the budget for the rest)
    paid = [o for o in options if o.cost > 0 and o.gain > 0]
    room = budget - spent
    steps = RESOLUTION + int(math.floor(-spent / budget * RESOLUTION))
    units = [math.ceil(o.cost / budget * RESOLUTION) for o in paid]
    best = np.zeros(steps + 1)                     # best gain within each number of budget steps
    taken = np.zeros((len(paid), steps + 1), bool)
    for i, (o, u) in enumerate(zip(paid, units)):
        if u > steps:
            continue
        with_it = best[:steps + 1 - u] + o.gain
        better = with_it > best[u:]
        taken[i, u:] = better
        best[u:] = np.where(better, with_it, best[u:])
    chosen, s = [], steps
    for i in range(len(paid) - 1, -1, -1):
        if taken[i, s]:
            chosen.append(paid[i])
            s -= units[i]
    out = free + chosen[::-1]
    assert sum(o.cost for o in chosen) <= room + 1e-12
    return out


def predicted(chosen: list[Option]) -> dict:
    """The recipe's predicted effect: the sum of its groups' effects, with their half-widths combined
    in quadrature (assumes independent errors)."""
    mean = float(sum(o.cost for o in chosen))
    halves = [(o.hi - o.lo) / 2 for o in chosen if o.lo is not None]
    half = math.sqrt(sum(h * h for h in halves)) if len(halves) == len(chosen) else None
    return {"mean": mean, "lo": None if half is None else mean - half, "hi": None if half is None else mean + half}


def verdict(pred: dict, measured: dict, limit: float) -> dict:
    """What the held-out measurement says of the recipe: whether it kept its budget (its interval below
    the limit, above it, or across), and whether the additive prediction held (the two intervals meet)."""
    if measured.get("lo") is None:
        return {"budget": "unknown (no interval)", "additive": "unknown (no interval)"}
    budget = ("kept" if measured["hi"] <= limit else "broken" if measured["lo"] > limit
              else "not decided (the interval straddles the limit)")
    lo, hi = (pred["lo"], pred["hi"]) if pred["lo"] is not None else (pred["mean"], pred["mean"])
    additive = "held" if lo <= measured["hi"] and measured["lo"] <= hi else (
        "failed: the groups together hurt more than the sum of their effects" if measured["lo"] > hi
        else "failed: the groups together hurt less than the sum of their effects")
    return {"budget": budget, "additive": additive, "gap": measured["mean"] - pred["mean"]}


def by_type(scan: dict) -> bool:
    """A scan of another type (its recipes trade bits), not of a radius or a table (they trade zeros)."""
    enc = scan["encoding"]
    return enc.get("radius") is None and enc.get("table") is None


def _side_file(row: dict, name: str, why: str) -> Path:
    path = Path(row["run_dir"]) / name
    if not path.exists():
        raise OrchestrateError(f"the scan's {row['name']} {why} ({path}) is gone from the cache: run the scan again")
    return path


def _gains(scan: dict) -> dict[str, int]:
    """Per tensor, what taking the encoding gains: bits saved (a type scan: R's tensor bytes minus E's,
    from their files) or zeros added (from R's and E's histograms)."""
    ref, enc = scan["variants"][1], scan["variants"][2]
    if by_type(scan):
        size = [{t.name: int(t.n_bytes) for t in analysis.open_model(_side_file(r, "model.gguf", "model")).tensors}
                for r in (ref, enc)]
        return {t: 8 * (size[0][t] - size[1][t]) for t in size[0] if t in size[1]}
    zeros = [stats.tensor_zeros(read_json(_side_file(r, "hist.json", "histograms"))) for r in (ref, enc)]
    return {t: zeros[1][t][0] - zeros[0][t][0] for t in zeros[0] if t in zeros[1]}


def options(scan: dict, quantity: str) -> list[Option]:
    """A scan's groups as recipe options: each group's effect on quantity, and what it gains."""
    gains = _gains(scan)
    out = []
    for g in scan["groups"]:
        e = g["effects"][quantity]
        out.append(Option(g["name"], tuple(g["tensors"]), e["mean"], e["lo"], e["hi"],
                          sum(gains.get(t, 0) for t in g["tensors"])))
    return out


def rules(scan: dict, chosen: list[Option]) -> list[str]:
    """The TENSOR rules of a radius or table recipe (none for a type recipe)."""
    enc = scan["encoding"]
    if by_type(scan):
        return []
    setting = (f"Q4_0_RADIUS={enc['radius']}" if enc.get("radius") is not None
               else f"TABLE_MODE={scan['variants'][2]['table_file']}")
    return [f"{groups.rule_pattern(t)} {setting}" for o in chosen for t in o.tensors]


def tensor_types(scan: dict, chosen: list[Option]) -> dict[str, str]:
    """The type overrides of a type recipe: each chosen tensor the type it has in E's file."""
    if not by_type(scan):
        return {}
    types = groups.tensor_types(_side_file(scan["variants"][2], "model.gguf", "model"))
    return {t: types[t] for o in chosen for t in o.tensors}
