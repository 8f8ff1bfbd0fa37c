"""The tail of the per-token KL divergence: its 90th, 99th and 99.9th percentiles and its maximum, per
variant, and the percentiles' differences to a reference variant, with intervals over chunks.

A mean KLD hides the few tokens a quantization ruins; users rank quants by the high percentiles. The
percentile is llama-perplexity's own rule (sorted values, linear interpolation at fraction * (n - 1),
in float32), so ours agree with the ones it prints. Chunks are the independent units (as in
study.paired). The estimand is the percentile of the token distribution of text like this one.

- A variant's own percentile: Woodruff's interval. The share of tokens at or below the estimate has a
  standard error from the chunks' shares; the interval is the order statistics at that level ± t of
  it (df = chunks - 1), rounded outwards. Simulated (tests/test_tails.py): 92-93% at 16 chunks, 93-95%
  at 64, for a nominal 95%; a percentile bootstrap covered only 80-90% there.
- A difference to the reference: a percentile bootstrap over chunks (expanded as in study.paired),
  each draw weighing every token by how often its chunk was drawn, the same draws for both variants so
  the difference is paired. Its simulated coverage is in tests/test_tails.py.
- The maximum has no interval: nothing bounds a maximum from the sample (no resample exceeds the
  observed one), so it is reported as what this text showed.
"""

import numpy as np

from .paired import MIN_CHUNKS, SEED, bootstrap_counts, expanded_alpha, t_quantile, unavailable
from .scores import Scores, check_paired

LEVELS = {"p90": 0.90, "p99": 0.99, "p999": 0.999}
LABELS = {"p90": "90%", "p99": "99%", "p999": "99.9%", "max": "max"}
CONFIDENCE = 0.95
DRAWS = 2000          # each draw is a pass over every token: fewer than the means' draws, ample for 2.5% tails
CELLS = 20_000_000    # tokens x draws handled at once (bounds memory at ~160 MB)
CURVE = 40            # points of each variant's quantile curve (for the figure)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile of ascending float32 values, computed as it does (float32)."""
    n = len(sorted_values)
    p = np.float32(fraction) * np.float32(n - 1)
    i = int(p)
    p = np.float32(p - np.float32(i))
    hi = sorted_values[min(i + 1, n - 1)]
    return float(np.float32((np.float32(1) - p) * sorted_values[i] + p * hi))


class _Sorted:
    """One variant's per-token KLD, sorted once, with each sorted token's chunk."""

    def __init__(self, kld: np.ndarray):
        n_chunk, per_chunk = kld.shape
        self.kld = kld
        flat = kld.reshape(-1)
        order = np.argsort(flat, kind="stable")
        self.values = flat[order]
        self.chunk = (order // per_chunk).astype(np.intp)
        self.n = flat.size

    def curve(self, fractions: np.ndarray) -> list[float]:
        return [percentile(self.values, f) for f in fractions]

    def points(self) -> dict:
        out = {k: percentile(self.values, f) for k, f in LEVELS.items()}
        out["max"] = float(self.values[-1])
        return out

    def woodruff(self, fraction: float, value: float) -> tuple[float, float]:
        """The interval of the percentile at fraction whose estimate is value (see the module's note)."""
        shares = (self.kld <= value).mean(axis=1)
        n_chunk = len(shares)
        half = t_quantile(1 - (1 - CONFIDENCE) / 2, n_chunk - 1) * shares.std(ddof=1) / np.sqrt(n_chunk)
        lo, hi = max(0.0, fraction - half), min(1.0, fraction + half)
        return (float(self.values[int(np.floor(lo * (self.n - 1)))]),
                float(self.values[min(self.n - 1, int(np.ceil(hi * (self.n - 1))))]))

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        """(draws, levels): the percentiles of each resample; counts (draws, n_chunk) say how often each
        chunk was drawn (every resample has n tokens: chunks hold the same number)."""
        out = np.empty((counts.shape[0], len(LEVELS)))
        step = max(1, CELLS // self.n)
        for s in range(0, counts.shape[0], step):
            cum = np.cumsum(counts[s:s + step][:, self.chunk], axis=1)  # the resample's sorted positions
            for j, f in enumerate(LEVELS.values()):
                p = f * (self.n - 1)
                i = int(p)
                lo = self.values[(cum <= i).sum(axis=1)]                      # its i-th smallest value
                hi = self.values[np.minimum((cum <= i + 1).sum(axis=1), self.n - 1)]
                out[s:s + step, j] = (1 - (p - i)) * lo + (p - i) * hi
        return out


def own_percentile(kld: np.ndarray, level: str) -> dict:
    """One (n_chunk, tokens) array of per-token KLD: its percentile at level (a LEVELS key), with
    Woodruff's interval from MIN_CHUNKS chunks on."""
    srt = _Sorted(np.asarray(kld, dtype=np.float32))
    value = percentile(srt.values, LEVELS[level])
    lo, hi = srt.woodruff(LEVELS[level], value) if kld.shape[0] >= MIN_CHUNKS else (None, None)
    return {"mean": value, "lo": lo, "hi": hi}


def _interval(boot: np.ndarray, n_chunk: int) -> tuple[float, float]:
    half = expanded_alpha(n_chunk, CONFIDENCE) / 2
    lo, hi = np.quantile(boot, [half, 1 - half])
    return float(lo), float(hi)


def _summaries(points: dict, intervals: list | None, n_chunk: int) -> dict:
    out = {}
    for j, k in enumerate(LEVELS):
        lo, hi = intervals[j] if intervals is not None else (None, None)
        out[k] = {"value": points[k], "lo": lo, "hi": hi}
    out["max"] = {"value": points["max"], "lo": None, "hi": None}
    if intervals is None:
        out["unavailable"] = unavailable(n_chunk)
    return out


def tails(scores: dict[str, Scores], reference: str | None, draws: int = DRAWS, seed: int = SEED) -> dict:
    """Every variant with per-token KLD: its tail percentiles and maximum, and (reference given) the
    percentiles' paired differences variant - reference, each with its interval."""
    klds = {n: s for n, s in scores.items() if "kld" in s.arrays}
    if not klds:
        return {}
    first = next(iter(klds.values()))
    for s in klds.values():
        check_paired(s, first)
    n_chunk = first.n_chunk
    enough = n_chunk >= MIN_CHUNKS
    sorted_ = {n: _Sorted(s.arrays["kld"]) for n, s in klds.items()}
    points = {n: srt.points() for n, srt in sorted_.items()}
    own = {n: [srt.woodruff(f, points[n][k]) for k, f in LEVELS.items()] if enough else None
           for n, srt in sorted_.items()}
    out = {"confidence": CONFIDENCE, "draws": draws, "seed": seed, "unit": "chunk", "reference": None,
           "levels": {k: LABELS[k] for k in [*LEVELS, "max"]},
           "variants": {n: _summaries(points[n], own[n], n_chunk) for n in klds}, "vs_reference": {}}
    # the curve's levels: from the median to the last token, evenly on a log scale of 1 - level
    beyond = np.logspace(np.log10(0.5), np.log10(1 / first.n_tokens), CURVE)
    out["curve"] = {"beyond": beyond.tolist(), "variants": {n: srt.curve(1 - beyond) for n, srt in sorted_.items()}}
    if reference in klds:
        out["reference"] = reference
        if enough:
            counts = np.concatenate(list(bootstrap_counts(n_chunk, draws, seed))).astype(np.int32)
            boot = {n: srt.resampled(counts) for n, srt in sorted_.items()}
        for n in klds:
            if n == reference:
                continue
            diff = {k: points[n][k] - points[reference][k] for k in [*LEVELS, "max"]}
            d = None if not enough else [_interval(boot[n][:, j] - boot[reference][:, j], n_chunk)
                                             for j in range(len(LEVELS))]
            out["vs_reference"][n] = _summaries(diff, d, n_chunk)
    return out
