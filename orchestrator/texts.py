"""Which text fits and which text scores: one text split in two (the first part to fit importance
matrices, tables or recipes, the rest to score them), and the record a sweep keeps of both, so that a
report can warn when a measurement was made on the text its subject was fitted to.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import OrchestrateError
from .fetch import sha256_of
from .files import write_atomic


@dataclass(frozen=True)
class Part:
    path: Path           # the part as a file of its own
    sha256: str
    source: Path         # the text it was cut from
    source_sha256: str
    start: int           # bytes [start, end) of the source
    end: int

    def describe(self) -> str:
        return f"bytes {self.start}..{self.end} of {self.source.name}"


def split(text: Path, fraction: float, cache: Path | None = None) -> tuple[Part, Part]:
    """text cut in two at the first line break at or after `fraction` of its bytes (at the byte when
    there is none): the fitting part and the scoring part, each kept as a file in the cache."""
    if not 0 < fraction < 1:
        raise OrchestrateError(f"split {fraction}: give the share of the text that fits, between 0 and 1")
    data = Path(text).read_bytes()
    cut = int(len(data) * fraction)
    newline = data.find(b"\n", cut)
    cut = newline + 1 if newline != -1 else cut
    if cut <= 0 or cut >= len(data):
        raise OrchestrateError(f"{text}: splitting it at {fraction:g} leaves one part empty")
    source_sha = sha256_of(Path(text))
    where = (cache or paths.cache_dir()) / "texts" / f"{source_sha[:16]}-{cut}"
    parts = []
    for name, (a, b) in (("fit", (0, cut)), ("score", (cut, len(data)))):
        path = where / f"{Path(text).stem}-{name}.txt"
        if not path.exists():
            write_atomic(path, data[a:b])
        parts.append(Part(path, hashlib.sha256(data[a:b]).hexdigest(), Path(text).resolve(), source_sha, a, b))
    return parts[0], parts[1]


def overlaps(a: dict, b: dict) -> bool:
    """Two text records (as record() writes them) share text: the same text, one a part of the other,
    or two parts of one text whose byte ranges meet."""
    if a["sha256"] == b["sha256"] or a["sha256"] == b.get("source_sha256") or b["sha256"] == a.get("source_sha256"):
        return True
    if a.get("source_sha256") is None or a.get("source_sha256") != b.get("source_sha256"):
        return False
    return a["start"] < b["end"] and b["start"] < a["end"]


def record(path: Path, sha256: str, part: Part | None = None) -> dict:
    """How results.json names a text: its file and hash, and the part of which source it is."""
    out = {"file": str(path), "sha256": sha256}
    if part is not None:
        out.update(source=str(part.source), source_sha256=part.source_sha256, start=part.start, end=part.end,
                   part=part.describe())
    return out
