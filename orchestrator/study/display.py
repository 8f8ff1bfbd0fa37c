"""What a study shows while it runs: which variant, which step, how far, and an ETA from the
variants done so far (one status line; in a log, details at most once a minute)."""

import re
import time

from ..proc import Progress
from ..results import Row, fmt_ppl
from .experiment import Variant
from .plan import duration


class Display:
    """Which variant, which step, and an overall ETA from the variants done so far."""

    def __init__(self, variants: list[Variant]):
        self.n, self.i, self.times, self.t0 = len(variants), 0, [], time.monotonic()
        self.shape = None
        self.progress = Progress(every=60)

    def step(self, v: Variant, what: str, detail: bool = False) -> None:
        """A new step is always shown; a detail (how far the step is) in a log at most once a minute."""
        eta = ""
        if self.times:
            eta = f"  (ETA {duration((self.n - self.i) * sum(self.times) / len(self.times))})"
        self.progress.show(f"[{self.i + 1}/{self.n}] {v.name}: {what}{eta}", force=not detail)

    def cluster(self, running: str, left: int, parallel: int) -> None:
        """What runs where (from the cluster's tasks), and an ETA for the variants left."""
        eta = ""
        if self.times:
            eta = f"  (ETA {duration(left * sum(self.times) / len(self.times) / parallel)} at {parallel} at a time)"
        shape = re.sub(r" \d+s\b", "", running)  # without the seconds: a log gets a line per change only
        if self.progress.tty or shape != self.shape:
            self.shape = shape
            self.progress.show(f"[{self.i}/{self.n} done] running: {running or 'waiting for the cluster'}{eta}",
                               force=True)

    def finished(self, v: Variant, row: Row, seconds: float, worked: bool) -> None:
        self.i += 1
        if worked:
            self.times.append(seconds)
        if row.status == "ok":
            msg = f"{fmt_ppl(row.ppl)} ± {fmt_ppl(row.ppl_err)}" + ("" if worked else " (cached)")
            if row.scored_for not in (None, row.name):
                msg += f" (same tensors as {row.scored_for}: scored once)"
        else:
            msg = f"FAILED: {row.reason}" + (f" (log: {row.log})" if row.log else "")
        self.progress.done(f"[{self.i}/{self.n}] {v.name}: {msg}")
