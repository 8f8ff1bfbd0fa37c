"""Run and score directories in the cache: the one owner of their keys, file names and format.

A run directory holds one variant's quantization (its log, sizes and the hooks' histograms), the
analysis of the model it wrote, and its result row, keyed by everything that determines them (base
model, fork build, variant, scoring settings, the user's --llama-env). A score directory holds a
model's perplexity and per-token scores (and the base's logits with --kld), keyed by what the model
computes with (its tensors' content), the text and the settings: variants whose tensors are
byte-identical (stock Q4_0 and radius 0) are scored once. Every other module reaches these files
through RunDir and ScoreDir.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from .. import paths, results
from ..files import read_json, write_atomic, write_json
from ..fork.build import Fork
from ..taskfiles import TaskFile
from ..tools.perplexity import Scoring
from . import analysis
from .base import Base
from .experiment import Variant

RUN_FORMAT = 8  # bump when a run or score directory's contents change, so older ones are not reused
LOCK = ".lock"  # held by whoever works in a directory (a live sweep, a cache collection)
USED = "used.json"  # which sweeps used a directory, and when (study.cache)


def lock_of(d: Path) -> filelock.FileLock:
    return filelock.FileLock(str(Path(d) / LOCK))


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        """The variant's name (the directory is <variant>-<key>)."""
        return self.path.name.rsplit("-", 1)[0]

    model = property(lambda self: self.path / "model.gguf")
    quantize = property(lambda self: self.path / "quantize.json")    # llama-quantize's sizes, command, time
    quantize_log = property(lambda self: self.path / "quantize.log")
    hist = property(lambda self: self.path / "hist.json")            # the hooks' histograms and sums
    analysis = property(lambda self: self.path / "analysis.json")    # tensor key, sizes, damage
    result = property(lambda self: self.path / "result.json")        # the row; written last
    error_log = property(lambda self: self.path / "error.log")
    lock = property(lambda self: lock_of(self.path))
    # what a cluster task sends back to the driver (the model stays on the worker)
    SMALL = ("quantize.json", "quantize.log", "hist.json", "analysis.json")


@dataclass(frozen=True)
class ScoreDir:
    path: Path

    perplexity = property(lambda self: self.path / "perplexity.json")  # the parsed figures; written last
    log = property(lambda self: self.path / "perplexity.log")
    scores = property(lambda self: self.path / "scores.bin")            # per-token scores (study.scores)
    logits = property(lambda self: self.path / "logits.bin")            # the base's, with --kld
    lock = property(lambda self: lock_of(self.path))
    SMALL = ("perplexity.json", "perplexity.log", "scores.bin")

    def answers(self, task: TaskFile) -> Path:
        """The model's answers to a task (tools.perplexity.answer's record); written last."""
        return self.path / f"answers-{task.key}.json"

    def all_answers(self) -> dict[str, Path]:
        """Every task's answers here, by the task file's key (whichever study asked for them)."""
        return {f.stem.removeprefix("answers-"): f for f in self.path.glob("answers-*.json")}

    def answers_log(self, task: TaskFile) -> Path:
        return self.path / f"answers-{task.key}.log"

    def small(self, tasks: tuple[TaskFile, ...]) -> tuple[str, ...]:
        """What a cluster task sends back of it."""
        return self.SMALL + tuple(p.name for t in tasks for p in (self.answers(t), self.answers_log(t)))

    def scored(self, logits: bool = False) -> bool:
        """Finished (and holding the base's logits, when asked)."""
        return self.perplexity.exists() and (not logits or self.logits.exists())

    def answered(self, tasks: tuple[TaskFile, ...]) -> bool:
        return all(self.answers(t).exists() for t in tasks)


@dataclass(frozen=True)
class ScanDir:
    """One scan group's model (R with E's tensors for the group), scored in rounds of chunks against
    the base: each round's per-token scores kept, so a chunk scored once is never scored again."""
    path: Path

    model = property(lambda self: self.path / "model.gguf")           # assembled; removed when done
    result = property(lambda self: self.path / "result.json")         # the verdict; written last
    lock = property(lambda self: lock_of(self.path))

    def scores(self, a: int, b: int) -> Path:
        return self.path / f"chunks-{a}-{b}.bin"

    def log(self, a: int, b: int) -> Path:
        return self.path / f"chunks-{a}-{b}.log"

    def rounds(self) -> dict[str, bytes]:
        """Its rounds' scores and logs by file name: what a cluster task takes and brings back."""
        return {f.name: f.read_bytes() for f in sorted(self.path.glob("chunks-*"))}


def quantize_type(q: dict) -> str:
    """The llama-quantize type of a run's quantize.json (its command: [tool, *extra, base, out, TYPE, threads])."""
    return q["command"][-2]


@dataclass(frozen=True)
class Inputs:
    """What every variant of one sweep shares."""
    fork: Fork
    base: Base
    text: Path
    text_id: str
    ctx: int
    chunks: int
    kld: bool
    threads: int
    llama_env: dict = field(default_factory=dict)  # the user's --llama-env, passed to every llama-* run
    cache: Path = field(default_factory=paths.cache_dir)  # holds runs/ and scores/ (a cluster worker's own)
    gpu_layers: int | None = None  # llama-perplexity -ngl (None: not passed)
    tasks: tuple[TaskFile, ...] = ()  # what every model also answers (in its score directory)

    @property
    def scoring(self) -> Scoring:
        return Scoring(self.text, self.ctx, self.chunks, self.threads, self.gpu_layers)


def _key(inp: Inputs, determined_by: dict) -> str:
    """A directory key from what determines its contents, with the sweep's perplexity settings."""
    determined_by = {**determined_by, "format": RUN_FORMAT, "fork": inp.fork.id, "llama_env": inp.llama_env,
                     "perplexity": {"text": inp.text_id, "ctx": inp.ctx, "chunks": inp.chunks, "kld": inp.kld}}
    if inp.gpu_layers is not None:  # (absent otherwise: the keys of CPU runs stay as they were)
        determined_by["gpu_layers"] = inp.gpu_layers
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True).encode()).hexdigest()[:16]


def run_key(inp: Inputs, v: Variant) -> str:
    # the analysis' format too: a run measured another way is done again (its scores are kept)
    return _key(inp, {"base": inp.base.sha256, "variant": v.spec(), "scan": analysis.SCAN_FORMAT})


def run_dir(inp: Inputs, v: Variant) -> RunDir:
    return RunDir(inp.cache / "runs" / f"{v.name}-{run_key(inp, v)}")


def score_dir(inp: Inputs, tensors: str, kld_base_tensors: str | None) -> ScoreDir:
    """Where a model with these tensors is scored: the same for every variant that has them.
    kld_base_tensors: the tensor key of the base whose logits a --kld variant is scored against."""
    return ScoreDir(inp.cache / "scores" / _key(inp, {"tensors": tensors, "kld_base": kld_base_tensors}))


def scan_dir(inp: Inputs, reference_tensors: str, encoding_tensors: str, tensors: tuple[str, ...]) -> ScanDir:
    """Where the group `tensors` of a scan of encoding E against reference R (their tensor keys) is scored."""
    return ScanDir(inp.cache / "scans" / _key(inp, {"reference": reference_tensors, "encoding": encoding_tensors,
                                                     "tensors": list(tensors)}))


def export(row: results.Row, out: Path) -> results.Row:
    """The row, with its variant's histograms, per-tensor damage and per-token scores copied into the
    sweep directory out (so it stands alone: figures are redrawn and pairs compared from it) and named
    in the new row's hist and damage fields."""
    out = Path(out)
    if row.status != "ok":
        return row.but(hist=None, damage=None)
    run = RunDir(Path(row.run_dir))
    if Path(row.scores_file or "/nonexistent").exists():
        write_atomic(results.scores_path(out, row.name), Path(row.scores_file).read_bytes())
    hist = damage = None
    if run.hist.exists():
        hist = results.hist_path(row.name)
        write_atomic(out / hist, run.hist.read_bytes())
    measured = read_json(run.analysis).get("damage") if run.analysis.exists() else None
    if measured:
        damage = results.damage_path(row.name)
        write_json(out / damage, measured)
    return row.but(hist=hist, damage=damage)
