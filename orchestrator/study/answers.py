"""Task answers compared question by question: each variant's accuracy, and its flips against the base
and the reference — questions it gets wrong that the other gets right (right→wrong) and the reverse
(wrong→right) — with McNemar's exact test and an interval for the paired difference of accuracy.

Two variants with the same accuracy can disagree on many answers; only the pairing shows it, and only a
paired test uses it (an unpaired test on the two accuracies ignores that they answered the same
questions). Questions are the independent units. What the intervals assume, and how they cover, is in
tests/test_answers.py's simulations:
- accuracy: Wilson's score interval (binomial questions);
- difference of accuracy: Newcombe's interval for paired proportions (his method 10: Wilson intervals
  of the two accuracies combined through the phi correlation of the pairs);
- McNemar's exact test: a two-sided binomial test of right→wrong against wrong→right, conditional on
  the discordant questions.
"""

import math
from statistics import NormalDist

CONFIDENCE = 0.95


def _z() -> float:
    return NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2)


def wilson(right: int, n: int) -> tuple[float, float]:
    """Wilson's score interval for a proportion right / n."""
    if n == 0:
        return 0.0, 1.0
    z, p = _z(), right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b right→wrong, c wrong→right; under no difference each discordant
    question goes either way with probability 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n may be thousands)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2 * tail)


def paired_difference(both: int, b: int, c: int, neither: int) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B, with Newcombe's method-10 interval. both: right in both; b: A
    right, B wrong; c: A wrong, B right; neither: wrong in both."""
    n = both + b + c + neither
    p1, p2 = (both + b) / n, (both + c) / n
    l1, u1 = wilson(both + b, n)
    l2, u2 = wilson(both + c, n)
    denominator = (both + b) * (c + neither) * (both + c) * (b + neither)
    phi = (both * neither - b * c) / math.sqrt(denominator) if denominator else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return d, max(-1.0, lo), min(1.0, hi)


def flips(a: str, b: str) -> dict:
    """Variant a's answers against b's (strings of 0/1, one per question, in the same order)."""
    if len(a) != len(b):
        raise ValueError("the two answer sets are not to the same questions")
    pairs = list(zip(a, b))
    both, worse = pairs.count(("1", "1")), pairs.count(("0", "1"))
    better, neither = pairs.count(("1", "0")), pairs.count(("0", "0"))
    d, lo, hi = paired_difference(both, better, worse, neither)
    return {"right_to_wrong": worse, "wrong_to_right": better, "agree": both + neither, "difference": d,
            "lo": lo, "hi": hi, "p": mcnemar_p(worse, better)}


def study(answers: dict[str, str], base: str | None, reference: str | None) -> dict:
    """One task: every variant's accuracy, and its flips against the base and the reference.
    answers: variant -> its answers (a 0/1 string in the order the questions were asked)."""
    out = {"confidence": CONFIDENCE, "base": base, "reference": reference, "variants": {}}
    for name, a in answers.items():
        lo, hi = wilson(a.count("1"), len(a))
        row = {"questions": len(a), "right": a.count("1"), "accuracy": a.count("1") / len(a) if a else None,
               "lo": lo, "hi": hi}
        for key, other in (("vs_base", base), ("vs_reference", reference)):
            if other in answers and other != name:
                row[key] = flips(a, answers[other])
        out["variants"][name] = row
    return out
