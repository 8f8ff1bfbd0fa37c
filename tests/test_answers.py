"""Answers compared question by question (study.answers): flips, McNemar's exact test and the intervals,
on synthetic data with a known answer, and their error rates and coverage by simulation."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from orchestrator.study import answers


def exact_mcnemar(b: int, c: int) -> float:
    """Independently: twice the smaller binomial tail at 1/2, in exact fractions."""
    n = b + c
    tail = sum(Fraction(comb(n, i), 2 ** n) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


@pytest.mark.parametrize("b, c", [(0, 5), (1, 9), (5, 5), (3, 12), (40, 20), (0, 0), (17, 3)])
def test_mcnemar_exact_values(b, c):
    assert answers.mcnemar_p(b, c) == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
    assert answers.mcnemar_p(b, c) == answers.mcnemar_p(c, b)


def test_mcnemar_known_values():
    assert answers.mcnemar_p(0, 5) == pytest.approx(0.0625)          # 2 / 2^5
    assert answers.mcnemar_p(1, 9) == pytest.approx(22 / 1024)       # 2 (1 + 10) / 2^10
    assert answers.mcnemar_p(3000, 3100) == pytest.approx(exact_mcnemar(3000, 3100), rel=1e-6)  # large counts


def test_flips_count_each_way():
    variant = "1100110010"
    base = "1111000011"
    f = answers.flips(variant, base)
    # base right, variant wrong: questions 3, 4, 10 (1-based); variant right, base wrong: 5, 6
    assert (f["right_to_wrong"], f["wrong_to_right"], f["agree"]) == (3, 2, 5)
    assert f["difference"] == pytest.approx(-0.1)
    assert f["lo"] < f["difference"] < f["hi"]
    with pytest.raises(ValueError):
        answers.flips("10", "101")


def test_study_compares_with_base_and_reference():
    s = answers.study({"base": "1111", "ref": "1110", "x": "0110"}, "base", "ref")
    assert s["variants"]["x"]["accuracy"] == 0.5 and s["variants"]["x"]["vs_base"]["right_to_wrong"] == 2
    assert s["variants"]["x"]["vs_reference"]["right_to_wrong"] == 1
    assert "vs_base" not in s["variants"]["base"] and "vs_reference" not in s["variants"]["ref"]


def test_mcnemar_rejects_at_most_five_percent_when_nothing_differs():
    # 4,000 pairs of variants that flip answers at random both ways at the same rate
    rng = np.random.default_rng(1)
    rejected = 0
    for _ in range(4000):
        discordant = rng.binomial(150, 0.15)
        b = rng.binomial(discordant, 0.5)
        rejected += answers.mcnemar_p(b, discordant - b) < 0.05
    print("McNemar type I error", rejected / 4000)
    assert rejected / 4000 <= 0.05


def test_mcnemar_finds_a_real_difference():
    rng = np.random.default_rng(2)
    found = sum(answers.mcnemar_p(b := rng.binomial(40, 0.8), 40 - b) < 0.05 for _ in range(1000))
    assert found / 1000 > 0.9  # 80/20 flips over 40 discordant questions


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5, 0.74])
def test_wilson_covers(p):
    rng = np.random.default_rng(int(100 * p))
    n, reps = 150, 4000
    hits = sum(lo <= p <= hi for lo, hi in (answers.wilson(int(k), n) for k in rng.binomial(n, p, reps)))
    print("Wilson coverage", p, hits / reps)
    assert hits / reps >= 0.93


@pytest.mark.parametrize("acc, loses, gains", [(0.74, 0.05, 0.05), (0.74, 0.20, 0.03), (0.5, 0.3, 0.3), (0.9, 0.02, 0.0)])
def test_paired_difference_covers(acc, loses, gains):
    # the base answers right with probability acc; the variant loses a right answer with probability
    # `loses` and gains a wrong one with probability `gains`: its true accuracy is known
    rng = np.random.default_rng(7)
    n, reps = 150, 3000
    truth = (acc * (1 - loses) + (1 - acc) * gains) - acc
    hits = 0
    for _ in range(reps):
        base = rng.random(n) < acc
        variant = np.where(base, rng.random(n) >= loses, rng.random(n) < gains)
        both, b = int((base & variant).sum()), int((variant & ~base).sum())
        c, neither = int((base & ~variant).sum()), int((~base & ~variant).sum())
        _, lo, hi = answers.paired_difference(both, b, c, neither)
        hits += lo <= truth <= hi
    print("Newcombe coverage", acc, loses, gains, hits / reps)
    assert hits / reps >= 0.93
