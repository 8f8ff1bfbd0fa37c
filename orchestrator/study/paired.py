"""Paired statistics of two variants scored on the same tokens.

Every variant is scored on the same text, so per-token differences remove what the tokens
share (some are hard for every variant) and compare far more sharply than each variant's own
error bar. Tokens of one chunk are not independent (they share a context window); chunks are
the independent units: the standard error is that of the chunk means of the differences, and
the confidence interval is a bootstrap over chunks, with a fixed seed so that a report is
reproducible.

A plain percentile bootstrap is too narrow over few units (simulated on chunk data like
tests/test_paired.py's: 90% coverage at 10 chunks, 93% at 20, for a nominal 95%), so the interval
is the *expanded* percentile bootstrap: the percentiles taken at the level alpha' = 2 Phi(-sqrt(n/(n-1)) t_{alpha/2, n-1}), which
widens it as Student's t would over n units. Simulated on chunk data like a sweep's (normal-ish chunk
means): 93.8% at 6 chunks, 94.7% at 8, 95% beyond. It assumes that chunk means are roughly
symmetric: for strongly skewed ones (log-normal) it covers about 89%. Below MIN_CHUNKS no interval,
verdict or group is given at all: they are reported as unavailable, with the chunks needed.
The mean NLL difference is ln(PPL(a) / PPL(b)).
"""

import functools
import math
from statistics import NormalDist

import numpy as np

from .scores import Scores, check_paired

CONFIDENCE = 0.95
DRAWS = 10_000
SEED = 20251124
QUANTITIES = {"nll": "ln(PPL ratio)", "kld": "KL divergence", "top": "same top token"}
# The fewest chunks with an interval: the smallest count at which the simulated coverage is within two
# points of 95% is 6 (93.8%); 8 (94.7%) keeps a margin for chunk data less regular than the simulation's.
MIN_CHUNKS = 8


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p > 0.5), by bisection on its distribution function (numerically
    integrated density: numpy has no t distribution, and this needs no other library)."""
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 20001)
        y = const * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
        return 0.5 + float((y[:-1] + y[1:]).sum() * (grid[1] - grid[0]) / 2)  # trapezoids
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@functools.lru_cache(maxsize=None)
def expanded_alpha(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided level whose bootstrap percentiles make the expanded interval over n units."""
    t = t_quantile(1 - (1 - confidence) / 2, n - 1)
    return 2 * NormalDist().cdf(-math.sqrt(n / (n - 1)) * t)


def unavailable(n: int) -> str:
    """Why a comparison over n chunks has no interval."""
    return (f"{n} chunk{'s' if n != 1 else ''} scored; an interval needs at least {MIN_CHUNKS} "
            f"(--chunks {MIN_CHUNKS} or more)")


def bootstrap_counts(n_chunks: int, draws: int = DRAWS, seed: int = SEED):
    """How often each chunk is drawn, (draws, n_chunks), in batches that bound memory. They depend only
    on the chunk count, draws and seed, so every variant and pair is resampled alike (and a pair shows
    the same interval in the report and in `orchestrate compare`)."""
    rng = np.random.default_rng(seed)
    batch = max(1, min(draws, 4_000_000 // max(1, n_chunks)))
    p = np.full(n_chunks, 1.0 / n_chunks)
    done = 0
    while done < draws:
        k = min(batch, draws - done)
        yield rng.multinomial(n_chunks, p, size=k)
        done += k


def bootstrap_weights(n_chunks: int, draws: int = DRAWS, seed: int = SEED):
    """The resampling weights of the means: bootstrap_counts divided by n_chunks."""
    for counts in bootstrap_counts(n_chunks, draws, seed):
        yield counts / n_chunks


def bootstrap_means(columns: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """(draws, k) bootstrap means of k columns of per-chunk values (n_chunks, k). The mean is linear,
    so the bootstrap of a difference is the difference of these columns."""
    return np.concatenate([w @ columns for w in bootstrap_weights(columns.shape[0], draws, seed)])


def _summarise(values: np.ndarray, boot: np.ndarray) -> dict:
    """Mean and standard error of per-chunk values (n_chunks,), the expanded interval from their
    bootstrap means; below MIN_CHUNKS no interval (lo, hi None) and why."""
    n = len(values)
    out = {"mean": float(values.mean()), "se": float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
           "lo": None, "hi": None, "n_chunks": n}
    if n < MIN_CHUNKS:
        return {**out, "unavailable": unavailable(n)}
    half = expanded_alpha(n) / 2
    lo, hi = np.quantile(boot, [half, 1 - half])
    return {**out, "lo": float(lo), "hi": float(hi)}


def summary(chunk_means: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> dict:
    """Mean, standard error and bootstrap interval of the mean of per-chunk values (n_chunks,)."""
    c = np.asarray(chunk_means, dtype=np.float64)
    return _summarise(c, bootstrap_means(c[:, None], draws, seed)[:, 0])


def _chunk_means(s: Scores, quantity: str) -> np.ndarray:
    return s.arrays[quantity].astype(np.float64).mean(axis=1)


def _unpaired_se(a: Scores, b: Scores) -> float:
    """The two variants' own (token-level, as llama-perplexity's) errors of mean NLL, combined."""
    own = [s.arrays["nll"].astype(np.float64).ravel() for s in (a, b)]
    return float(np.sqrt(sum(x.var() / (len(x) - 1) for x in own)))


class _Resampled:
    """Per-chunk means and their bootstrap means for a set of (variant, quantity) columns."""

    def __init__(self, scores: dict[str, Scores], columns: list[tuple[str, str]], draws: int):
        self.scores = scores
        self.index = {c: i for i, c in enumerate(columns)}
        self.means = np.stack([_chunk_means(scores[n], q) for n, q in columns], axis=1)
        self.boot = bootstrap_means(self.means, draws)

    def compare(self, a: str, b: str | None, quantity: str = "nll") -> dict:
        i = self.index[(a, quantity)]
        if b is None:
            out = _summarise(self.means[:, i], self.boot[:, i])
        else:
            check_paired(self.scores[a], self.scores[b])
            j = self.index[(b, quantity)]
            out = _summarise(self.means[:, i] - self.means[:, j], self.boot[:, i] - self.boot[:, j])
            if quantity == "nll":
                out["unpaired_se"] = _unpaired_se(self.scores[a], self.scores[b])
        out["n_tokens"] = self.scores[a].n_tokens
        return out


def compare(a: Scores, b: Scores | None, quantity: str = "nll", draws: int = DRAWS) -> dict:
    """a - b for one quantity (a alone when b is None), with its paired error and interval.
    For NLL also the unpaired error: the two variants' own errors combined, as if independent."""
    found = {"a": a} if b is None else {"a": a, "b": b}
    return _Resampled(found, [(n, quantity) for n in found], draws).compare("a", None if b is None else "b", quantity)


def distinguishable(c: dict) -> bool:
    """The interval excludes 0 (False when there is no interval)."""
    return c["lo"] is not None and not (c["lo"] <= 0 <= c["hi"])


def groups(ranking: list[str], pair) -> list[list[str]]:
    """Groups of variants that cannot be told apart: from each variant in the ranking (best first),
    the run of those after it that are all indistinguishable from it; runs inside an earlier
    run are dropped. pair(a, b) gives the comparison of two names. A variant may be in two
    groups (indistinguishability is not transitive)."""
    out: list[list[str]] = []
    for i, name in enumerate(ranking):
        run = [name]
        for other in ranking[i + 1:]:
            if distinguishable(pair(name, other)):
                break
            run.append(other)
        if not out or not set(run) <= set(out[-1]):
            out.append(run)
    return out


def study(scores: dict[str, Scores], base: str | None, reference: str | None) -> dict:
    """Everything the report shows: each variant against the base and against the reference,
    the ranking by mean NLL, and the groups that cannot be told apart."""
    names = list(scores)
    first = next(iter(scores.values()))
    for s in scores.values():
        check_paired(s, first)
    r = _Resampled(scores, [(n, q) for n in names for q in QUANTITIES if q in scores[n].arrays], DRAWS)
    out = {"confidence": CONFIDENCE, "draws": DRAWS, "seed": SEED, "unit": "chunk", "base": base,
           "reference": reference, "vs_base": {}, "vs_reference": {}, "alone": {}}
    for n in names:
        if base and n != base:
            out["vs_base"][n] = r.compare(n, base)
        if reference and n != reference:
            out["vs_reference"][n] = {q: r.compare(n, reference, q) for q in QUANTITIES
                                      if q in scores[n].arrays and q in scores[reference].arrays}
        out["alone"][n] = {q: r.compare(n, None, q) for q in QUANTITIES if q != "nll" and q in scores[n].arrays}
    means = {n: float(scores[n].arrays["nll"].astype(np.float64).mean()) for n in names}
    out["ranking"] = sorted(names, key=lambda n: means[n])
    out["n_chunks"] = first.n_chunk
    if first.n_chunk < MIN_CHUNKS:
        out["groups"], out["unavailable"] = None, unavailable(first.n_chunk)
    else:
        out["groups"] = groups(out["ranking"], r.compare)
    return out


def _verdict(a: str, b: str, c: dict, worse: str, better: str) -> str:
    if c["lo"] is None:
        return f"no verdict: {c['unavailable']}"
    if not distinguishable(c):
        return f"{a} and {b} cannot be told apart at {CONFIDENCE:.0%} (the interval contains 0)"
    return f"{a} is {worse if c['mean'] > 0 else better} than {b} at {CONFIDENCE:.0%}"


def report_pair(a: str, b: str, sa: Scores, sb: Scores) -> list[str]:
    """`orchestrate compare`: the pair's differences, in words and numbers."""
    c = compare(sa, sb, "nll")
    lines = [f"{a} vs {b}: {sa.n_tokens} tokens in {sa.n_chunk} chunks of {sa.n_ctx} "
             f"(paired by token; {CONFIDENCE:.0%} intervals from {DRAWS} bootstrap draws over chunks)",
             f"  ln(PPL ratio)  {c['mean']:+.5f}{_error(c)}",
             f"  PPL ratio      {np.exp(c['mean']):.5f}"
             + (f"  [{np.exp(c['lo']):.5f}, {np.exp(c['hi']):.5f}]" if c["lo"] is not None else "")]
    if c["se"] is None:
        lines.append(f"  unpaired error ± {c['unpaired_se']:.5f}; no paired error from one chunk")
    elif c["se"] > 0:
        lines.append(f"  unpaired error ± {c['unpaired_se']:.5f} (the two perplexities' own errors combined): "
                     f"the paired error is {c['unpaired_se'] / c['se']:.1f}x smaller")
    else:
        lines.append(f"  unpaired error ± {c['unpaired_se']:.5f}; paired error 0: the two scored every token alike")
    lines.append("  " + _verdict(a, b, c, "worse", "better"))
    for q, label in (("kld", "KL divergence"), ("top", "same top token")):
        if q in sa.arrays and q in sb.arrays:
            d = compare(sa, sb, q)
            scale, unit = (100, " points") if q == "top" else (1, "")
            lines.append(f"  {label:<14} {scale * d['mean']:+.5f}{unit}{_error(d, scale)}")
    return lines


def _error(c: dict, scale: float = 1) -> str:
    """' ± se  [lo, hi]' of a comparison, leaving out what it does not have (never a nan)."""
    out = f" ± {scale * c['se']:.5f}" if c["se"] is not None else ""
    if c["lo"] is None:
        return out + f"  (no interval: {c['unavailable']})"
    return out + f"  [{scale * c['lo']:+.5f}, {scale * c['hi']:+.5f}]"
