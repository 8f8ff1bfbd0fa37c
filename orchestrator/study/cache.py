"""The run cache: what it holds, and clearing what is no longer wanted (`orchestrate cache`).

Run directories (a variant's quantization, analysis and results) and score directories (a
model's perplexity and per-token scores; the base's logits with --kld) live under the cache,
and a cluster node's own ones under <cache>/worker. A sweep records in each directory it uses
which sweep used it and when (used.json), as each variant finishes, so the cache can be listed
per sweep and collected by last use. A directory that a live sweep holds locked is never
touched. Facts about files (paths.CACHE_FACTS: downloads, demo files, upcast bases, memos) are left alone.
"""

import datetime
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from ..errors import OrchestrateError
from ..files import read_json, taken_now, write_json
from ..results import Row
from .runs import USED, RunDir, ScoreDir, lock_of

KINDS = {"runs": "run", "scores": "score", "worker/runs": "worker run", "worker/scores": "worker score"}


@dataclass
class Entry:
    path: Path
    kind: str                      # run | score | worker run | worker score
    name: str                      # the variant (a score: the variant it was measured for)
    size: int
    last_use: float
    sweeps: dict = field(default_factory=dict)  # output directory -> time of its last use
    logits: bool = False           # a score directory holding the base's logits

    @property
    def sweep(self) -> str | None:
        return max(self.sweeps, key=self.sweeps.get) if self.sweeps else None


def _unlocked(d: Path) -> filelock.FileLock | None:
    """The directory's lock, now held by the caller, or None when a live sweep holds it."""
    lock = lock_of(d)
    return lock if taken_now(lock) else None


def record(row: Row, sweep: Path) -> None:
    """A finished variant was used by this sweep now: note it in its run and score directories."""
    if row.status != "ok":
        return
    for d in (row.run_dir, row.score_dir):
        if d and Path(d).is_dir():
            lock = _unlocked(Path(d))
            if lock is None:
                continue  # another sweep is at work there, and will record its own use
            try:
                used = _used(Path(d))
                used[str(sweep)] = time.time()
                write_json(Path(d) / USED, used)
            finally:
                lock.release()


def _used(d: Path) -> dict:
    try:
        return dict(read_json(d / USED))
    except (OSError, ValueError):
        return {}


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.is_symlink())


def _name(d: Path, kind: str) -> str:
    if "run" in kind:
        return RunDir(d).name
    try:
        return read_json(ScoreDir(d).perplexity)["scored_for"]
    except (OSError, ValueError, KeyError):
        return "(unfinished)"


def entries(root: Path) -> list[Entry]:
    out = []
    for sub, kind in KINDS.items():
        base = root / sub
        if not base.is_dir():
            continue
        for d in sorted(base.iterdir()):
            if not d.is_dir():
                continue
            used = _used(d)
            last = max(used.values()) if used else max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.iterdir()])
            out.append(Entry(d, kind, _name(d, kind), _size(d), last, used, ScoreDir(d).logits.exists()))
    return out


def parse_age(text: str) -> float:
    """Seconds in "30d", "12h", "45m", "2w"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text or "")
    if not m:
        raise OrchestrateError(f"--older-than {text}: expected a number and a unit, e.g. 30d, 12h, 45m, 2w")
    return float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]


def doomed(items: list[Entry], older_than: float | None, keep_last: int | None, now: float) -> list[Entry]:
    """What gc removes: entries last used longer ago than older_than, and not used by one of the
    keep_last most recently used sweeps (with both, both must hold)."""
    if older_than is None and keep_last is None:
        raise OrchestrateError("say what to remove: --older-than AGE and/or --keep-last N")
    kept_sweeps: set[str] = set()
    if keep_last is not None:
        last_use: dict[str, float] = {}
        for e in items:
            for s, t in e.sweeps.items():
                last_use[s] = max(t, last_use.get(s, 0))
        kept_sweeps = set(sorted(last_use, key=last_use.get, reverse=True)[:keep_last])
    return [e for e in items
            if (older_than is None or now - e.last_use > older_than) and not (kept_sweeps & set(e.sweeps))]


def remove(e: Entry) -> bool:
    """Delete an entry unless a live sweep holds it; True when removed."""
    lock = _unlocked(e.path)
    if lock is None:
        return False
    try:
        shutil.rmtree(e.path)
    finally:
        lock.release()
    return True


def in_use(e: Entry) -> bool:
    lock = _unlocked(e.path)
    if lock is not None:
        lock.release()
    return lock is None


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def listing(items: list[Entry]) -> list[str]:
    """The cache per sweep (most recently used first), then what no sweep recorded."""
    by_sweep: dict[str | None, list[Entry]] = {}
    for e in items:
        by_sweep.setdefault(e.sweep, []).append(e)
    order = sorted((s for s in by_sweep if s), key=lambda s: -max(e.last_use for e in by_sweep[s])) + \
        ([None] if None in by_sweep else [])
    lines = []
    for s in order:
        group = by_sweep[s]
        lines.append(f"{s or '(no sweep recorded: unfinished, or made before usage was recorded)'}: "
                     f"{len(group)} directories, {human(sum(e.size for e in group))}, "
                     f"last used {when(max(e.last_use for e in group))}")
        for e in sorted(group, key=lambda e: (e.name, e.kind)):
            extra = " (base logits)" if e.logits else ""
            lines.append(f"  {e.kind:<12} {e.name:<22} {human(e.size):>9}  {when(e.last_use)}  {e.path.name}{extra}")
    lines.append(f"total: {len(items)} directories, {human(sum(e.size for e in items))}")
    return lines
