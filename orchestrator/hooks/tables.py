"""Translation tables fitted to a model's own Q8_0 value distribution.

- balanced-fit: 16 contiguous int8 ranges of (as near as possible) equal probability mass,
  each level chosen as the thesis did: the range's end nearest zero, the two extreme ranges
  their outermost Q8_0 value (-127, 127).
- optimal: the 16 ranges and integer levels that minimise the expected squared error of the
  int8 values (Lloyd-Max / 1-D k-means), found exactly by dynamic programming over contiguous
  ranges (in one dimension an optimal quantizer's cells are intervals): no random restarts.
Both are deterministic functions of the 256-bin histogram (values -128..127).
"""

from pathlib import Path

import numpy as np

from ..files import write_atomic
from .conf import Table, load_table

VALUES = np.arange(-128, 128)
K = 16


def _partition(cost: np.ndarray) -> list[tuple[int, int]]:
    """Split 0..n-1 into K contiguous non-empty segments minimising the sum of cost[i, j]
    (the cost of segment i..j inclusive). Exact; ties broken towards earlier cuts."""
    n = cost.shape[0]
    best = np.full((K + 1, n + 1), np.inf)
    arg = np.zeros((K + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, K + 1):
        for j in range(k, n + 1):  # first j values in k segments; the last is i..j-1
            i = np.arange(k - 1, j)
            total = best[k - 1, i] + cost[i, j - 1]
            m = int(np.argmin(total))
            best[k, j], arg[k, j] = total[m], i[m]
    cuts, j = [], n
    for k in range(K, 0, -1):
        i = int(arg[k, j])
        cuts.append((i, j - 1))
        j = i
    return cuts[::-1]


def _prefix(h: np.ndarray):
    w = np.concatenate([[0.0], np.cumsum(h)])
    wx = np.concatenate([[0.0], np.cumsum(h * VALUES)])
    wxx = np.concatenate([[0.0], np.cumsum(h * VALUES.astype(float) ** 2)])
    return w, wx, wxx


def _check(h) -> np.ndarray:
    h = np.asarray(h, dtype=float)
    if h.shape != (256,) or (h < 0).any() or h.sum() <= 0:
        raise ValueError("a Q8_0 histogram has 256 non-negative counts (values -128..127), not all zero")
    return h / h.sum()


def fit_balanced(hist, name: str = "balanced-fit") -> Table:
    p = _check(hist)
    w, _, _ = _prefix(p)
    i, j = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    mass = np.where(j >= i, w[np.minimum(j + 1, 256)] - w[i], np.inf)
    cost = (mass - 1.0 / K) ** 2  # sum of squared deviations from equal mass
    segs = _partition(cost)
    levels = []
    for c, (a, b) in enumerate(segs):
        lo, hi = int(VALUES[a]), int(VALUES[b])
        if c == 0:
            level = -127 if hi >= -127 else -128       # outermost Q8_0 value
        elif c == K - 1:
            level = 127
        else:
            level = 0 if lo <= 0 <= hi else (hi if hi < 0 else lo)  # the end nearest zero
        levels.append(level)
    return _table(name, segs, levels)


def fit_optimal(hist, name: str = "optimal") -> Table:
    p = _check(hist)
    w, wx, wxx = _prefix(p)
    i, j = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    jj = np.minimum(j + 1, 256)
    W, S, Q = w[jj] - w[i], wx[jj] - wx[i], wxx[jj] - wxx[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(W > 0, S / W, 0.0)
    level = np.round(mean)
    # squared error of a segment stored as its nearest-integer mean (the best integer level)
    cost = np.where(j >= i, np.maximum(Q - 2 * level * S + level ** 2 * W, 0.0), np.inf)
    segs = _partition(cost)
    levels = []
    for a, b in segs:
        if W[a, b] > 0:
            levels.append(int(np.clip(np.round(S[a, b] / W[a, b]), VALUES[a], VALUES[b])))
        else:
            levels.append(int(VALUES[a]))  # an empty range: any level inside it keeps the order
    return _table(name, segs, levels)


def _table(name: str, segs, levels) -> Table:
    lo = tuple(int(VALUES[a]) for a, _ in segs)
    hi = tuple(int(VALUES[b]) for _, b in segs)
    return Table(name, Path(f"{name}.table"), lo, hi, tuple(levels))


def expected_sq_error(table: Table, hist) -> float:
    """E[(q - level[code(q)])^2] under the histogram, in squared int8 units."""
    p = _check(hist)
    out = table.translate(VALUES.astype(np.int16).clip(-128, 127).astype(np.int8)).astype(float)
    return float((p * (VALUES - out) ** 2).sum())


def code_masses(table: Table, hist) -> np.ndarray:
    p = _check(hist)
    return np.array([p[lo + 128:hi + 129].sum() for lo, hi in zip(table.lo, table.hi)])


def write_table(table: Table, path: Path, note: str) -> Table:
    """Write a .table file (atomically) and read it back with the validating loader."""
    lines = [f"# {note}", "# code  lo  hi  level"]
    lines += [f"{c - 8:3d} {a:5d} {b:5d} {lev:5d}" for c, (a, b, lev) in enumerate(zip(table.lo, table.hi, table.level))]
    write_atomic(Path(path), ("\n".join(lines) + "\n").encode())
    return load_table(Path(path), table.name)


FITTED = ("balanced-fit", "optimal")  # fitted to the model's Q8_0 histogram (fit())
# fitted at sweep time in other ways: to the importance-weighted histogram (needs an importance matrix),
# and one optimal table per tensor, to that tensor's own histogram (applied by per-tensor rules)
FITTED_AT_SWEEP = FITTED + ("optimal-weighted", "per-tensor")

# The standard 4-bit codebooks as tables on the Q8_0 grid. A Q8_0 block stores q = round(w / d) with
# d = absmax / 127, so the grid spans the block's absmax as +-127; each codebook's levels are put on it
# at that scale, and every int8 value is encoded as its nearest level (ties to the level nearer -128).
CODEBOOKS = ("nf4", "iq4nl", "uniform")  # codebook_levels' names (the tables in conf/tables/ made from them)
IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
NF4_OFFSET = 0.9677083  # QLoRA's: the outermost normal quantile used, so that +-1 are the extreme levels


def nf4_levels() -> list[float]:
    """NF4's 16 levels in [-1, 1] (QLoRA): 8 positive and 7 negative quantiles of the standard normal,
    evenly spaced in probability between NF4_OFFSET and 1/2, zero, each side scaled to its extreme."""
    from statistics import NormalDist
    q = NormalDist().inv_cdf
    pos = [q(NF4_OFFSET + (0.5 - NF4_OFFSET) * i / 8) for i in range(8)]   # 8 from the outermost inwards
    neg = [-q(NF4_OFFSET + (0.5 - NF4_OFFSET) * i / 7) for i in range(7)]  # 7
    top = max(pos)
    return sorted([v / top for v in pos + neg] + [0.0])


def codebook_levels(name: str) -> list[int]:
    """The int8 levels of a built-in codebook: nf4 (NF4's levels x 127, rounded), iq4nl (IQ4_NL's own
    int8 values: it, too, spans the block's absmax as 127 — its own quantizer also searches the block
    scale, which a table on Q8_0's fixed scale does not), uniform (16 evenly spaced levels over -127..127)."""
    if name == "nf4":
        return [round(127 * v) for v in nf4_levels()]
    if name == "iq4nl":
        return list(IQ4NL)
    if name == "uniform":
        return [round(-127 + 254 * i / 15) for i in range(16)]
    raise ValueError(f"no built-in codebook {name}")


def nearest_table(name: str, levels: list[int]) -> Table:
    """The table that encodes every int8 value as its nearest level."""
    levels = sorted(levels)
    his = [(a + b) // 2 for a, b in zip(levels, levels[1:])] + [127]  # a tie goes to the lower level
    los = [-128] + [h + 1 for h in his[:-1]]
    return Table(name, Path(name), tuple(los), tuple(his), tuple(levels))


def fit(name: str, hist) -> Table:
    return {"balanced-fit": fit_balanced, "optimal": fit_optimal}[name](hist, name)
