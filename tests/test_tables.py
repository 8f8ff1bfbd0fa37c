"""Fitted translation tables on synthetic distributions with known answers."""

from pathlib import Path

import numpy as np
import pytest

from orchestrator.hooks import conf, tables

CONF_TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"
Q = np.arange(-128, 128)


def dist(kind: str) -> np.ndarray:
    q = Q.astype(float)
    h = {
        "gaussian": np.exp(-0.5 * (q / 30) ** 2),
        "laplace": np.exp(-np.abs(q) / 12),
        "uniform": np.ones(256),
        "bimodal": np.exp(-0.5 * ((q - 50) / 10) ** 2) + np.exp(-0.5 * ((q + 70) / 15) ** 2),
        "skewed": np.where(q > 0, np.exp(-q / 5), np.exp(q / 40)),
        "q8_0-like": np.exp(-np.abs(q) / 25) + (np.abs(q) == 127) * 0.01,
    }[kind]
    h = np.round(h / h.sum() * 1e7)
    h[0] = 0  # Q8_0 never stores -128
    return h.astype(np.int64)


KINDS = ["gaussian", "laplace", "uniform", "bimodal", "skewed", "q8_0-like"]


def partition_cost(t, h):
    return float(((tables.code_masses(t, h) - 1 / 16) ** 2).sum())


def random_tables(rng, n):
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(-127, 128), size=15, replace=False))
        lo = np.concatenate([[-128], cuts])
        hi = np.concatenate([cuts - 1, [127]])
        yield conf.Table("random", Path("random.table"), tuple(int(x) for x in lo), tuple(int(x) for x in hi), tuple(int(x) for x in lo))


@pytest.mark.parametrize("kind", KINDS)
def test_optimal_error_is_never_above_the_other_tables(kind):
    h = dist(kind)
    opt = tables.fit_optimal(h)
    others = [conf.load_table(CONF_TABLES / "basic.table"), conf.load_table(CONF_TABLES / "balanced.table"),
              tables.fit_balanced(h)]
    e = tables.expected_sq_error(opt, h)
    for t in others:
        assert e <= tables.expected_sq_error(t, h) + 1e-12, t.name
    # and no table with other ranges does better either
    rng = np.random.default_rng(0)
    for t in random_tables(rng, 200):
        best = conf.Table("r", t.path, t.lo, t.hi, tuple(
            int(np.clip(np.round((h[a + 128:b + 129] * Q[a + 128:b + 129]).sum() / max(h[a + 128:b + 129].sum(), 1)), a, b))
            for a, b in zip(t.lo, t.hi)))
        assert e <= tables.expected_sq_error(best, h) + 1e-12


def test_known_answers():
    # 16 equal spikes: each gets its own code and is stored exactly
    h = np.zeros(256, dtype=np.int64)
    spikes = np.linspace(-120, 120, 16).round().astype(int)
    h[spikes + 128] = 1000
    opt = tables.fit_optimal(h)
    assert tables.expected_sq_error(opt, h) == 0.0 and list(opt.level) == list(spikes)
    bal = tables.fit_balanced(h)
    assert np.allclose(tables.code_masses(bal, h), 1 / 16)
    # uniform: balanced-fit takes 16 ranges of 16 values; the least error with integer levels is
    # that of 16-value ranges, (16^2 - 1) / 12 + 1/4 (the level is half a step off the mean)
    u = np.ones(256, dtype=np.int64)
    bal = tables.fit_balanced(u)
    assert [b - a + 1 for a, b in zip(bal.lo, bal.hi)] == [16] * 16
    assert np.allclose(tables.code_masses(bal, u), 1 / 16)
    assert tables.expected_sq_error(tables.fit_optimal(u), u) == pytest.approx((16 ** 2 - 1) / 12 + 0.25)


@pytest.mark.parametrize("kind", KINDS)
def test_balanced_fit_masses_are_as_equal_as_the_levels_allow(kind):
    h = dist(kind)
    bal = tables.fit_balanced(h)
    c = partition_cost(bal, h)
    assert c <= partition_cost(conf.load_table(CONF_TABLES / "balanced.table"), h) + 1e-15
    rng = np.random.default_rng(1)
    assert all(c <= partition_cost(t, h) + 1e-15 for t in random_tables(rng, 300))
    # one value can hold more than 1/16 of the mass; otherwise every code is near 1/16
    m = tables.code_masses(bal, h)
    assert m.max() - m.min() <= 2 * (h / h.sum()).max() + 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_fits_are_deterministic_valid_tables(kind, tmp_path):
    h = dist(kind)
    for fit in (tables.fit_balanced, tables.fit_optimal):
        a, b = fit(h), fit(h.copy())
        assert (a.lo, a.hi, a.level) == (b.lo, b.hi, b.level)
        back = tables.write_table(a, tmp_path / f"{a.name}.table", "test")  # the validating loader accepts it
        assert (back.lo, back.hi, back.level) == (a.lo, a.hi, a.level)
    bal = tables.fit_balanced(h)
    assert bal.level[0] in (-127, -128) and bal.level[-1] == 127
    for c in range(1, 15):  # the thesis's rule: the end nearest zero
        lo, hi, lev = bal.lo[c], bal.hi[c], bal.level[c]
        assert lev == (0 if lo <= 0 <= hi else hi if hi < 0 else lo)


def test_bad_histogram_is_refused():
    with pytest.raises(ValueError):
        tables.fit_optimal(np.zeros(256))
    with pytest.raises(ValueError):
        tables.fit_balanced(np.ones(16))


def exact_partition(cost) -> float:
    """The least total cost of 16 contiguous non-empty ranges covering the 256 int8 values, by a plain
    dynamic program written here on its own (cost(a, b): of the range a..b, as indices 0..255)."""
    n, k = 256, 16
    seg = {(a, b): cost(a, b) for a in range(n) for b in range(a, n)}
    best = [0.0] + [float("inf")] * n  # best[j]: the first j values in the ranges so far
    for parts in range(1, k + 1):
        new = [float("inf")] * (n + 1)
        for j in range(parts, n - (k - parts) + 1):
            new[j] = min(best[i] + seg[(i, j - 1)] for i in range(parts - 1, j))
        best = new
    return best[n]


def least_integer_error(p, a, b) -> float:
    """A range's least squared error over every integer level inside it, tried one by one."""
    v, w = Q[a:b + 1].astype(float), p[a:b + 1]
    if w.sum() == 0:
        return 0.0
    return float(min(((v - level) ** 2 * w).sum() for level in range(Q[a], Q[b] + 1)))


@pytest.mark.parametrize("kind", ["gaussian", "bimodal", "q8_0-like"])
def test_optimal_and_balanced_fits_reach_the_exact_optimum(kind):
    h = dist(kind)
    p = h / h.sum()
    best_error = exact_partition(lambda a, b: least_integer_error(p, a, b))
    assert tables.expected_sq_error(tables.fit_optimal(h), h) == pytest.approx(best_error, rel=1e-9, abs=1e-12)
    best_balance = exact_partition(lambda a, b: (p[a:b + 1].sum() - 1 / 16) ** 2)
    assert partition_cost(tables.fit_balanced(h), h) == pytest.approx(best_balance, rel=1e-9, abs=1e-15)


# The standard 4-bit codebooks, against independent sources
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]  # QLoRA's NF4 table (bitsandbytes), as published


def test_nf4_levels_are_the_normal_quantiles_qlora_publishes():
    assert tables.nf4_levels() == pytest.approx(NF4_PUBLISHED, abs=2e-6)
    assert tables.codebook_levels("nf4") == [round(127 * v) for v in NF4_PUBLISHED]


def test_iq4nl_levels_are_ggmls(fork):
    import re
    src = (fork.build_dir.parent / "llama.cpp" / "ggml" / "src" / "ggml-common.h").read_text()
    body = re.search(r"kvalues_iq4nl, 16\)\s*([-\d,\s]+)GGML_TABLE_END", src).group(1)
    assert tables.codebook_levels("iq4nl") == [int(x) for x in body.replace(",", " ").split()]


@pytest.mark.parametrize("name", ["nf4", "iq4nl", "uniform"])
def test_codebook_tables_encode_each_value_as_its_nearest_level(name):
    shipped = conf.load_table(Path(conf.__file__).parents[2] / "conf" / "tables" / f"{name}.table")
    levels = np.array(tables.codebook_levels(name))
    assert list(shipped.level) == list(levels)
    for v in range(-128, 128):
        code = next(k for k in range(16) if shipped.lo[k] <= v <= shipped.hi[k])
        distance = np.abs(levels - v)
        assert distance[code] == distance.min() and (code == 0 or distance[code - 1] > distance[code]), (name, v)
    if name == "uniform":
        assert len(set(np.diff(levels))) <= 2 and levels[0] == -127 and levels[-1] == 127  # steps of 16.9, rounded


def test_weighted_fitting_lowers_the_weighted_error():
    # plain counts spread evenly; the importance sits on 16 values only: the weighted fit puts a level
    # on each of them (weighted error 0), the plain fit cannot know to
    plain = np.ones(256)
    heavy = np.arange(-120, 120, 15)  # 16 values
    weighted = np.full(256, 1e-6)
    weighted[heavy + 128] = 1000.0
    w_table, p_table = tables.fit_optimal(weighted, "w"), tables.fit_optimal(plain, "p")
    assert sorted(w_table.level) == sorted(heavy.tolist())
    assert tables.expected_sq_error(w_table, weighted) < 1e-6 < tables.expected_sq_error(p_table, weighted)
    assert tables.expected_sq_error(p_table, plain) <= tables.expected_sq_error(w_table, plain)
