"""The scan's stopping rule, by simulation against known answers: its interval at the look where it
stops covers the true effect at the stated 95% despite the repeated looks; unadjusted looks do not."""

import numpy as np
import pytest

from orchestrator.study import sequential

REPS = 4000


def run(diffs, looks, threshold=None, width=None):
    """The rule applied to a whole sequence of per-chunk differences, as the scan applies it round by
    round (study.scan.scan_group): the look where it stops."""
    for k, n in enumerate(looks):
        v = sequential.look(diffs[:n], len(looks), k == len(looks) - 1, threshold, width)
        if v.verdict != "more":
            return v


def kld_like_chunks(rng, reps, n, effect, rho_tokens=0.6, tokens=64):
    """reps sequences of n per-chunk paired differences shaped like a scan's: each chunk the mean over
    AR(1)-correlated tokens of a skewed (lognormal) per-token KLD of the group's model minus the
    reference's, the two correlated token by token. The true mean difference is `effect`."""
    z = np.empty((reps, n, tokens))
    z[..., 0] = rng.standard_normal((reps, n))
    for t in range(1, tokens):  # correlated tokens inside each chunk
        z[..., t] = rho_tokens * z[..., t - 1] + np.sqrt(1 - rho_tokens ** 2) * rng.standard_normal((reps, n))
    ref = np.exp(0.8 * z - 0.32)                                  # mean 1
    group = ref * (1 + effect) + 0.3 * ref * rng.standard_normal((reps, n, tokens))
    return (group - ref).mean(axis=2)


def coverage(naive, threshold, width, effect, seed=1):
    """Share of repetitions whose final interval covers the true effect, and share of chunks used."""
    looks = sequential.schedule(64, first=8)
    hits = used = 0
    for d in kld_like_chunks(np.random.default_rng(seed), REPS, 64, effect):
        v = _unadjusted(d, looks, threshold) if naive else run(d, looks, threshold, width)
        hits += v.lo <= effect <= v.hi
        used += v.chunks
    return hits / REPS, used / (REPS * 64)


def _unadjusted(d, looks, threshold):
    """The naive rule: a plain 95% interval at every look (as if there were one look)."""
    for k, n in enumerate(looks):
        v = sequential.look(d[:n], 1, k == len(looks) - 1, threshold)
        if v.verdict != "more":
            return v


@pytest.mark.parametrize("effect, threshold, width", [
    (0.0, 0.0, None),     # no effect, tested against 0: the worst case for repeated looks
    (0.02, 0.0, None),    # a small effect: often decided early
    (0.05, 0.05, None),   # the effect right at the threshold: never decided, all looks taken
    (0.03, None, 0.01),   # a width target
])
def test_the_interval_where_the_rule_stops_covers_at_95(effect, threshold, width):
    cov, used = coverage(False, threshold, width, effect)
    print(f"effect {effect}, threshold {threshold}, width {width}: coverage {cov:.4f}, chunks used {used:.2f}")
    se = np.sqrt(0.95 * 0.05 / REPS)
    assert cov >= 0.95 - 3 * se, f"coverage {cov:.3f} (chunks used {used:.2f} of all)"


def test_unadjusted_repeated_looks_do_not_cover():
    """The check above can fail: with a plain 95% interval at each of the looks, stopping as soon as it
    excludes 0 loses coverage when there is no effect."""
    cov, _ = coverage(True, 0.0, None, 0.0)
    print(f"unadjusted looks: coverage {cov:.4f}")
    assert cov < 0.93, cov


def test_a_clear_effect_stops_early():
    rng = np.random.default_rng(7)
    looks = sequential.schedule(64, first=8)
    used = [run(d, looks, 0.0).chunks for d in kld_like_chunks(rng, 200, 64, 0.3)]
    assert np.mean(used) <= 0.25 * 64


def test_schedule():
    assert sequential.schedule(64, first=8) == [8, 16, 32, 64]
    assert sequential.schedule(20, first=8) == [8, 16, 20]
    assert sequential.schedule(20, first=8, align=3) == [9, 18, 20]
    assert sequential.schedule(5, first=8) == [5]
    looks = sequential.schedule(100, first=8, align=4)
    assert all(n % 4 == 0 for n in looks[:-1]) and looks == sorted(set(looks)) and looks[-1] == 100


def test_the_other_quantitys_interval_at_the_stopping_look_covers_at_95():
    """The scan stops on KLD and reports NLL's interval at the same look, at the same alpha / K level: by
    the same union bound it covers too. Here NLL's differences are correlated with KLD's (the stopping
    depends on them) and have a true mean of 0.01."""
    rng = np.random.default_rng(3)
    looks = sequential.schedule(64, first=8)
    kld = kld_like_chunks(rng, REPS, 64, 0.02)
    nll = 0.01 + 0.8 * (kld - 0.02) + 0.02 * rng.standard_normal(kld.shape)
    hits = 0
    for a, b in zip(kld, nll):
        v = run(a, looks, 0.0)
        _, lo, hi = sequential.interval(b[:v.chunks], 0.05 / len(looks))
        hits += lo <= 0.01 <= hi
    cov = hits / REPS
    print(f"NLL interval at KLD's stopping look: coverage {cov:.4f}")
    assert cov >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / REPS), cov
