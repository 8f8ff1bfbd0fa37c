"""When to stop scoring a scan's group: looks at a fixed schedule, the error rate spent over them.

Each group is scored in rounds of chunks; after each round (a "look") its effect — the mean over
chunks of the paired per-chunk difference against the reference — gets a Student-t interval at level
1 - alpha / K, where K is the number of looks the schedule allows. By Bonferroni's inequality all K
intervals hold together with probability at least 1 - alpha, so the interval at whichever look the
rule stops is a 1 - alpha interval however the stopping depended on the data (repeated looks at an
unadjusted 95% interval would not be: tests/test_sequential.py shows both by simulation).

A group stops at the first look where its interval lies wholly above or wholly below the threshold
(the effect is decided against it), or is no wider than the asked half-width, or at the last look.

Assumes the chunks' paired differences are independent with a finite variance (chunks are disjoint
stretches of text; what is correlated inside a chunk is inside one chunk mean), and enough chunks at
the first look for the t interval (paired.MIN_CHUNKS).
"""

import math
from dataclasses import dataclass

import numpy as np

from .paired import CONFIDENCE, MIN_CHUNKS, t_quantile

FIRST = MIN_CHUNKS


def schedule(max_chunks: int, first: int = FIRST, align: int = 1) -> list[int]:
    """Chunks scored by each look: first, then doubling, each a multiple of align (llama-perplexity
    batches that many chunks together: a round must start where a batch would), the last max_chunks."""
    if max_chunks < first:
        return [max_chunks]
    looks, n = [], first
    while n < max_chunks:
        aligned = -(-n // align) * align
        if aligned >= max_chunks:
            break
        if not looks or aligned > looks[-1]:
            looks.append(aligned)
        n *= 2
    return looks + [max_chunks]


@dataclass(frozen=True)
class Look:
    chunks: int
    mean: float
    lo: float | None
    hi: float | None
    verdict: str   # above | below (the threshold) | narrow (the width reached) | undecided | all chunks | more


def interval(diffs: np.ndarray, alpha: float) -> tuple[float, float | None, float | None]:
    """Mean and two-sided 1 - alpha Student-t interval of the per-chunk differences."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return mean, None, None
    half = t_quantile(1 - alpha / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def look(diffs: np.ndarray, n_looks: int, last: bool, threshold: float | None = None, width: float | None = None,
         confidence: float = CONFIDENCE) -> Look:
    """The verdict on a group after a look at its per-chunk differences so far."""
    mean, lo, hi = interval(diffs, (1 - confidence) / n_looks)
    verdict = "more"
    if lo is not None and threshold is not None and lo > threshold:
        verdict = "above"
    elif hi is not None and threshold is not None and hi < threshold:
        verdict = "below"
    elif lo is not None and width is not None and (hi - lo) / 2 <= width:
        verdict = "narrow"
    elif last:  # the most chunks: the threshold not decided, or the width not reached
        verdict = "undecided" if threshold is not None else "all chunks"
    return Look(len(diffs), mean, lo, hi, verdict)
