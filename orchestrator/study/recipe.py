"""A recipe: which groups of tensors take which of one or more scans' encodings (all against the same
reference), for the most gain under a budget on the predicted damage — and the check of that prediction
on text the scans never saw.

The choice assumes that the groups' effects add up (as Thireus's quant_assign does, and never checks):
each group's effect under an encoding is what that encoding's scan measured for the group alone against
the reference, and the recipe's predicted effect is their sum. Maximising the gain (zeros added, bits
saved) under "sum of effects <= budget", at most one encoding per group, is a multiple-choice knapsack
(a 0/1 knapsack with one scan), solved by dynamic programming over costs rounded up to 1/RESOLUTION of
the budget: the choice never breaks the budget on the scans' own figures, and it is optimal up to that
rounding. The prediction comes from the chunks every chosen group was scored on: groups are scored on
the same chunks (each on chunks 0..n-1 of the text, n where it stopped), so a chunk that is hard for
one group tends to be hard for all, and a group that stopped early did so on what its first chunks
said. Per chunk the groups' differences are added, and the mean of those totals over the first
min(n) chunks gets the scan's own interval (Student's t at 1 - 0.05/K for the K looks: min(n) is one
of the looks, so Bonferroni's union over them covers whichever it is). It assumes chunks independent
of each other, as the scan's intervals do. tests/test_recipe.py simulates it against a known sum with
groups stopped by the scan's rule on skewed, correlated chunks: coverage 0.949-0.986 for 4 to 60
groups from independent to a correlation of 0.95 (the quadrature of half-widths used before: 0.81 for
4 groups at 0.95, 0.44 for 20; a pairwise-covariance sum of the groups' own means: 0.927 for 20
groups at 0.95, undone by the early stops). Groups without per-chunk figures (scans made before they were kept) get
the sum of their means and of their half-widths, valid under any correlation. The measurement on
held-out text is the real check, and what tells whether the additive model held.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OrchestrateError
from ..files import read_json
from . import analysis, groups, paired, scores, sequential, stats, tails
from .scan import group_tokens
from .paired import CONFIDENCE

RESOLUTION = 2000   # budget steps of the knapsack
QUANTITIES = {"kld": "mean KLD", "nll": "ln(PPL ratio)",
              **{f"kld_{k}": f"{tails.LABELS[k]} KLD" for k in tails.LEVELS}}
TAIL_BUDGETS = 60   # mean-KLD budgets tried for a tail budget


@dataclass(frozen=True)
class Option:
    """A scan group under one scan's encoding: what taking it costs (its effect on `quantity`, with
    interval) and gains (zeros added or bits saved). Options of the same group are alternatives."""
    group: str
    tensors: tuple[str, ...]
    cost: float
    lo: float | None
    hi: float | None
    gain: int
    per_chunk: tuple[float, ...] | None = None   # its differences to R on chunks 0.. (the scan's)
    scan: int = 0                                # which scan (encoding) it comes from


@dataclass(frozen=True)
class Budget:
    quantity: str      # kld | nll (the effect over the reference's) | kld_p90, kld_p99, kld_p999 (the recipe's own)
    limit: float

    @property
    def label(self) -> str:
        return f"{self.quantity}<={self.limit:g}"

    @property
    def tail(self) -> str | None:
        """The tail level (a study.tails.LEVELS key) of a percentile budget, else None."""
        return self.quantity.removeprefix("kld_") if self.quantity.startswith("kld_") else None


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
    """At most one option per group, of most total gain, whose costs sum to at most budget.

    Each group's alternatives are shifted so that its cheapest (or leaving the group alone, cost 0) costs
    nothing, the budget growing by the same amount: then every group takes exactly one alternative of
    non-negative cost, rounded up to the budget's 1/RESOLUTION (so rounding never breaks the budget)."""
    by_group: dict[str, list[Option]] = {}
    for o in options:
        if o.gain > 0:  # (an option that gains nothing is never worth its damage)
            by_group.setdefault(o.group, []).append(o)
    shifts = {g: min(0.0, *(o.cost for o in alts)) for g, alts in by_group.items()}
    steps = int(math.floor((budget - sum(shifts.values())) / budget * RESOLUTION + 1e-9))
    best = np.zeros(steps + 1)                     # best gain within each number of budget steps
    picks = []
    for g, alts in by_group.items():
        units = [math.ceil((c - shifts[g]) / budget * RESOLUTION - 1e-9) for c in [0.0] + [o.cost for o in alts]]
        gains = [0] + [o.gain for o in alts]
        new, pick = np.full(steps + 1, -np.inf), np.zeros(steps + 1, int)
        for k, (u, gain) in enumerate(zip(units, gains)):
            if u > steps:
                continue
            cand = best[:steps + 1 - u] + gain
            better = cand > new[u:]
            new[u:] = np.where(better, cand, new[u:])
            pick[u:] = np.where(better, k, pick[u:])
        best = new
        picks.append((alts, units, pick))
    chosen, s = [], steps
    for alts, units, pick in reversed(picks):
        k = int(pick[s])
        if k:
            chosen.append(alts[k - 1])
        s -= units[k]
    chosen.reverse()
    assert sum(o.cost for o in chosen) <= budget + 1e-9
    return chosen


def predicted(chosen: list[Option], n_looks: int = 1) -> dict:
    """The recipe's predicted effect: the mean over the chunks every chosen group was scored on of the
    sum of their differences, at the scan's look level; without per-chunk figures, the sum of the groups'
    means with the sum of their half-widths."""
    if not chosen:
        return {"mean": 0.0, "lo": 0.0, "hi": 0.0, "chunks": None}
    if all(o.per_chunk for o in chosen):
        n = min(len(o.per_chunk) for o in chosen)
        total = np.sum([np.asarray(o.per_chunk[:n], dtype=np.float64) for o in chosen], axis=0)
        mean, lo, hi = sequential.interval(total, (1 - CONFIDENCE) / n_looks)
        return {"mean": mean, "lo": lo, "hi": hi, "chunks": n}
    mean = float(sum(o.cost for o in chosen))
    if any(o.lo is None for o in chosen):
        return {"mean": mean, "lo": None, "hi": None, "chunks": None}
    half = sum((o.hi - o.lo) / 2 for o in chosen)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "chunks": None}


def tail_prediction(chosen: list[Option], reference: np.ndarray, tokens: dict, level: str) -> dict:
    """The recipe's own KLD percentile at level, predicted token by token: on the chunks every chosen
    group was scored on, R's per-token KLD plus each group's per-token change (tokens: per option, its
    (chunks, tokens) KLD; never below 0), with Woodruff's interval of that percentile. It assumes that
    the groups' changes add up token by token (stronger than adding up on average)."""
    n = min([len(reference)] + [len(tokens[o]) for o in chosen])
    total = reference[:n].astype(np.float64) + sum((tokens[o][:n] - reference[:n] for o in chosen),
                                                   np.zeros_like(reference[:n], dtype=np.float64))
    return {**tails.own_percentile(np.maximum(total, 0.0), level), "chunks": n}


def kld_tokens(scans: list[dict], options: list[Option]) -> tuple[np.ndarray, dict]:
    """R's per-token KLD over the scans' chunks and each option's group's (from the scans' kept rounds)."""
    ref = scores.read(Path(scans[0]["reference"]["scores"])).arrays["kld"]
    tokens = {}
    for o in options:
        g = next(g for g in scans[o.scan]["groups"] if g["name"] == o.group)
        tokens[o] = group_tokens(Path(g["scan_dir"]), tuple(scans[o.scan]["settings"]["looks"]), g["chunks"], "kld")
    return ref, tokens


def choose_for_tail(options: list[Option], limit: float, predict) -> list[Option]:
    """For a budget on the recipe's own KLD percentile, which no sum of groups' effects gives: the
    mean-KLD knapsack's choices at TAIL_BUDGETS mean budgets (geometric, up to the options' total), the
    one of most gain whose predicted percentile (predict(chosen)["mean"]) is at most limit."""
    total = sum(o.cost for o in options if o.cost > 0) or 1.0
    best: list[Option] = []
    for b in np.geomspace(total / 1e4, total, TAIL_BUDGETS):
        chosen = choose(options, float(b))
        if sum(o.gain for o in chosen) > sum(o.gain for o in best) and predict(chosen)["mean"] <= limit:
            best = chosen
    return best


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


def against_globals(x: float, chunks: np.ndarray, globals_: list[tuple[str, float, np.ndarray]]) -> dict | None:
    """The recipe against the global settings at its own zeros (or bits): of the two measured global
    settings whose x brackets the recipe's, the straight line between them at x — per chunk, their
    chunk means weighted by where x lies — and the recipe's paired difference to that line, with its
    bootstrap interval over chunks (study.paired.summary). A uniform setting of exactly the recipe's
    zeros or bits rarely exists (radii and types come in steps); the line is what mixing the two
    bracketing settings would give if effects added up. None when no two settings bracket x."""
    below = [g for g in globals_ if g[1] <= x]
    above = [g for g in globals_ if g[1] >= x]
    if not below or not above:
        return None
    (n1, x1, c1), (n2, x2, c2) = max(below, key=lambda g: g[1]), min(above, key=lambda g: g[1])
    w = 0.0 if x2 == x1 else (x - x1) / (x2 - x1)
    diff = paired.summary(np.asarray(chunks) - ((1 - w) * np.asarray(c1) + w * np.asarray(c2)))
    verdict = ("not told apart" if diff["lo"] is None or diff["lo"] <= 0 <= diff["hi"]
               else "better" if diff["hi"] < 0 else "worse")
    return {"between": [n1, n2], "weight": w, "difference": diff, "verdict": verdict}


def by_type(scan: dict) -> bool:
    """A scan of another type (its recipes trade bits), not of a radius or a table (they trade zeros)."""
    enc = scan["encoding"]
    return enc.get("radius") is None and enc.get("table") is None


def check_together(scans: list[dict]) -> None:
    """Scans a recipe may choose among: one model, text and reference, the same groups and scoring."""
    first = scans[0]
    for sc in scans[1:]:
        for what, get in (("base model", lambda d: d["base"]["sha256"]), ("text", lambda d: d["text_sha256"]),
                          ("reference", lambda d: d["reference"]["type"]), ("grouping", lambda d: d["settings"]["by"]),
                          ("-c and chunks", lambda d: (d["settings"]["ctx"], d["settings"]["chunks"])),
                          ("kind of gain (zeros or bits)", by_type)):
            if get(sc) != get(first):
                raise OrchestrateError(f"the scans of {first['encoding']['name']} and {sc['encoding']['name']} "
                                       f"differ in their {what}: a recipe chooses among scans of one model, text, "
                                       "reference, grouping and scoring")
    for sc in scans:
        if (sc.get("screen") or {}).get("screened"):
            raise OrchestrateError(f"the scan of {sc['encoding']['name']} was screened: {len(sc['screen']['screened'])} "
                                   "groups have no effect of their own to choose by (scan without --screen)")
    names = [sc["encoding"]["name"] for sc in scans]
    if len(set(names)) != len(names):
        raise OrchestrateError(f"the same encoding scanned twice among the scans ({', '.join(names)})")


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


def options(scans: list[dict], quantity: str) -> list[Option]:
    """The scans' groups as recipe options: each group's effect on quantity under each scan's encoding,
    and what it gains."""
    out = []
    for i, scan in enumerate(scans):
        gains = _gains(scan)
        for g in scan["groups"]:
            e = g["effects"][quantity]
            per_chunk = g.get("per_chunk", {}).get(quantity)
            out.append(Option(g["name"], tuple(g["tensors"]), e["mean"], e["lo"], e["hi"],
                              sum(gains.get(t, 0) for t in g["tensors"]), tuple(per_chunk) if per_chunk else None, i))
    return out


def rules(scans: list[dict], chosen: list[Option]) -> list[str]:
    """The TENSOR rules of a radius or table recipe (none for a type recipe)."""
    out = []
    for o in chosen:
        scan = scans[o.scan]
        if by_type(scan):
            continue
        enc = scan["encoding"]
        setting = (f"Q4_0_RADIUS={enc['radius']}" if enc.get("radius") is not None
                   else f"TABLE_MODE={scan['variants'][2]['table_file']}")
        out += [f"{groups.rule_pattern(t)} {setting}" for t in o.tensors]
    return out


def tensor_types(scans: list[dict], chosen: list[Option]) -> dict[str, str]:
    """The type overrides of a type recipe: each chosen tensor the type it has in its scan's E file."""
    out = {}
    for o in chosen:
        if by_type(scans[o.scan]):
            types = groups.tensor_types(_side_file(scans[o.scan]["variants"][2], "model.gguf", "model"))
            out.update({t: types[t] for t in o.tensors})
    return out
