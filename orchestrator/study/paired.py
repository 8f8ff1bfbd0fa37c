"""Paired statistics of two variants scored on the same tokens.

Every variant is scored on the same text, so per-token differences remove what the tokens
share (some are hard for every variant) and compare far more sharply than each variant's own
error bar. Tokens of one chunk are not independent (they share a context window); chunks are
the independent units: the standard error is that of the chunk means of the differences, and
the confidence interval is a percentile bootstrap over chunks, with a fixed seed so that a
report is reproducible. The mean NLL difference is ln(PPL(a) / PPL(b)).
"""

import numpy as np

from .scores import Scores, check_paired

CONFIDENCE = 0.95
DRAWS = 10_000
SEED = 20251124
QUANTITIES = {"nll": "ln(PPL ratio)", "kld": "KL divergence", "top": "same top token"}


def bootstrap_weights(n_chunks: int, draws: int = DRAWS, seed: int = SEED):
    """Resampling weights (draws, n_chunks), in batches that bound memory: each row says how often
    each chunk was drawn, divided by n_chunks. The same draws serve every variant (common
    random numbers), so every pair is resampled alike."""
    rng = np.random.default_rng(seed)
    batch = max(1, min(draws, 4_000_000 // max(1, n_chunks)))
    p = np.full(n_chunks, 1.0 / n_chunks)
    done = 0
    while done < draws:
        k = min(batch, draws - done)
        yield rng.multinomial(n_chunks, p, size=k) / n_chunks
        done += k


def summary(chunk_means: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> dict:
    """Mean, standard error and bootstrap interval of the mean of per-chunk values (n_chunks,)."""
    c = np.asarray(chunk_means, dtype=np.float64)
    n = len(c)
    boot = np.concatenate([w @ c for w in bootstrap_weights(n, draws, seed)])
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return {"mean": float(c.mean()), "se": float(c.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "lo": float(lo), "hi": float(hi), "n_chunks": n}


def _chunk_means(s: Scores, quantity: str) -> np.ndarray:
    return s.arrays[quantity].astype(np.float64).mean(axis=1)


def compare(a: Scores, b: Scores | None, quantity: str = "nll", draws: int = DRAWS) -> dict:
    """a - b for one quantity (a alone when b is None), with its paired error and interval.
    For NLL also the unpaired error: the two variants' own errors combined, as if independent."""
    if b is None:
        out = summary(_chunk_means(a, quantity), draws)
    else:
        check_paired(a, b)
        out = summary(_chunk_means(a, quantity) - _chunk_means(b, quantity), draws)
        if quantity == "nll":
            own = [s.arrays["nll"].astype(np.float64).ravel() for s in (a, b)]
            out["unpaired_se"] = float(np.sqrt(sum(x.var() / (len(x) - 1) for x in own)))
    out["n_tokens"] = a.n_tokens
    return out


def distinguishable(c: dict) -> bool:
    return not (c["lo"] <= 0 <= c["hi"])


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
    quantities = [q for q in QUANTITIES if all(q in s.arrays for n, s in scores.items() if n != base)]
    cache: dict[tuple, dict] = {}

    def pair(a, b, q="nll"):
        if (a, b, q) not in cache:
            cache[(a, b, q)] = compare(scores[a], scores[b], q)
        return cache[(a, b, q)]

    out = {"confidence": CONFIDENCE, "draws": DRAWS, "seed": SEED, "unit": "chunk", "base": base,
           "reference": reference, "vs_base": {}, "vs_reference": {}, "alone": {}}
    for n in names:
        if base and n != base:
            out["vs_base"][n] = pair(n, base)
        if reference and n != reference:
            out["vs_reference"][n] = {q: pair(n, reference, q) for q in quantities
                                      if q in scores[n].arrays and q in scores[reference].arrays}
        if n != base:
            out["alone"][n] = {q: compare(scores[n], None, q) for q in quantities if q != "nll"}
    means = {n: float(scores[n].arrays["nll"].astype(np.float64).mean()) for n in names}
    out["ranking"] = sorted(names, key=lambda n: means[n])
    out["groups"] = groups(out["ranking"], pair)
    return out


def _verdict(a: str, b: str, c: dict, worse: str, better: str) -> str:
    if not distinguishable(c):
        return f"{a} and {b} cannot be told apart at {CONFIDENCE:.0%} (the interval contains 0)"
    return f"{a} is {worse if c['mean'] > 0 else better} than {b} at {CONFIDENCE:.0%}"


def report_pair(a: str, b: str, sa: Scores, sb: Scores) -> list[str]:
    """`orchestrate compare`: the pair's differences, in words and numbers."""
    c = compare(sa, sb, "nll")
    lines = [f"{a} vs {b}: {sa.n_tokens} tokens in {sa.n_chunk} chunks of {sa.n_ctx} "
             f"(paired by token; {CONFIDENCE:.0%} intervals from {DRAWS} bootstrap draws over chunks)",
             f"  ln(PPL ratio)  {c['mean']:+.5f} ± {c['se']:.5f}  [{c['lo']:+.5f}, {c['hi']:+.5f}]",
             f"  PPL ratio      {np.exp(c['mean']):.5f}  [{np.exp(c['lo']):.5f}, {np.exp(c['hi']):.5f}]",
             f"  unpaired error ± {c['unpaired_se']:.5f} (the two perplexities' own errors combined): "
             f"the paired error is {c['unpaired_se'] / c['se']:.1f}x smaller" if c["se"] > 0 else
             f"  unpaired error ± {c['unpaired_se']:.5f}; paired error 0: the two scored every token alike",
             "  " + _verdict(a, b, c, "worse", "better")]
    for q, label in (("kld", "KL divergence"), ("top", "same top token")):
        if q in sa.arrays and q in sb.arrays:
            d = compare(sa, sb, q)
            scale, unit = (100, " points") if q == "top" else (1, "")
            lines.append(f"  {label:<14} {scale * d['mean']:+.5f}{unit} ± {scale * d['se']:.5f}  "
                         f"[{scale * d['lo']:+.5f}, {scale * d['hi']:+.5f}]")
    return lines
