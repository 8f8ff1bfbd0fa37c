"""A sweep's output directory: its results document (results.json: schema, how it is made
and read), the artifacts copied beside it (hist/, damage/, scores/) and its lock.

The sweep writes the document and the report reads it; it belongs to neither, so neither
imports the other. One lock per output directory keeps a sweep and `orchestrate plot` (or
two sweeps) from writing into it at once.
"""

import contextlib
import dataclasses
import datetime
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from .errors import OrchestrateError
from .files import read_json, taken_now

SCHEMA = "orchestrate.sweep/1"
FILE = "results.json"
LOCK = ".sweep.lock"


ROW_VERSION = 2  # of Row's dictionary form; rows of the landed format (no version) are version 1; 2 adds
# the KLD tail percentiles and the task answers


def _csv(**kw):
    return field(default=None, metadata={"csv": True}, **kw)


@dataclass(frozen=True)
class Row:
    """One variant's result: made once (by the study), replaced rather than changed, written into
    results.json (and result.json in its run directory) by to_dict and read back by from_dict. The
    fields marked csv are results.csv's columns, in this order."""
    name: str = _csv()
    kind: str = _csv()                        # base | stock | table | radius
    type: str | None = _csv()                 # the llama-quantize type (the base: what it is)
    mode: str | None = _csv()                 # simple | pablo (the configuration file's word)
    radius: int | None = _csv()
    table: str | None = _csv()
    status: str = _csv()                      # ok | failed
    ppl: float | None = _csv()
    ppl_err: float | None = _csv()
    kld: float | None = _csv()
    kld_err: float | None = _csv()
    same_top: float | None = _csv()
    same_top_err: float | None = _csv()
    rms_dp: float | None = _csv()
    kld_p90: float | None = _csv()             # percentiles of the per-token KLD (study.tails)
    kld_p99: float | None = _csv()
    kld_p999: float | None = _csv()
    kld_max: float | None = _csv()
    file_bytes: int | None = _csv()
    bpw: float | None = _csv()
    code_bpw: float | None = _csv()           # a table variant's bits per weight as 4-bit codes, tables included
    table_bpw: float | None = _csv()          # of which its tables' own bytes
    zero_fraction: float | None = _csv()
    isolated_zero_share: float | None = _csv()
    entropy_bpw: float | None = _csv()
    rle_bpw: float | None = _csv()
    zstd_bpw: float | None = _csv()
    zstd_sampled: float | None = _csv()
    weight_rel_rmse: float | None = _csv()
    table_file: str | None = _csv()
    quantize_seconds: float | None = _csv()
    perplexity_seconds: float | None = _csv()
    analysis_seconds: float | None = _csv()
    scored_for: str | None = _csv()           # the variant its score was measured for (same tensors: shared)
    tensor_key: str | None = _csv()
    reason: str | None = _csv()               # why it failed
    log: str | None = _csv()                  # its failure's log
    run_dir: str | None = _csv()
    main_type: str | None = None              # the tensor type holding most weights
    tensor_types: dict | None = None          # weights per tensor type
    ppl_chunks: list | None = None            # the running perplexity after each chunk
    rms_dp_err: float | None = None
    elements: int | None = None
    commands: list | None = None              # every llama-* command run for it
    score_dir: str | None = None
    scores_file: str | None = None
    hist: str | None = None                   # its histograms in the sweep directory (relative)
    damage: str | None = None                 # its per-tensor weight errors there (relative)
    ran_on: dict | None = None                # where and when, on a cluster

    def to_dict(self) -> dict:
        return {"row_version": ROW_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        version = d.get("row_version", 1)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"row_version"}
        if version > ROW_VERSION or unknown:
            raise OrchestrateError(f"a result row of version {version} with fields {sorted(unknown)}: "
                                   "made by a newer orchestrate")
        return cls(**{k: v for k, v in d.items() if k in known})

    def but(self, **changes) -> "Row":
        """A new row with these fields changed (a row itself never changes)."""
        return dataclasses.replace(self, **changes)


CSV_COLUMNS = [f.name for f in dataclasses.fields(Row) if f.metadata.get("csv")]


def fmt_ppl(v: float) -> str:
    """Perplexities of broken variants reach 1e16: keep those readable."""
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.3e}"


def scores_path(out: Path, name: str) -> Path:
    """A variant's per-token scores, as copied into the sweep directory."""
    return Path(out) / "scores" / f"{name}.bin"


def hist_path(name: str) -> str:
    """A variant's histograms in the sweep directory (relative to it)."""
    return f"hist/{name}.json"


def damage_path(name: str) -> str:
    """A variant's per-tensor weight errors in the sweep directory (relative to it)."""
    return f"damage/{name}.json"


def document(name: str, description: str, base, text: Path, text_sha256: str, settings: dict, fork,
             rows: list[Row], measurement: dict) -> dict:
    """base: a study.base.Base; fork: a fork.build.Fork; settings: the perplexity settings; measurement:
    how sizes were measured (study.analysis.measurement)."""
    return {
        "schema": SCHEMA,
        "name": name,
        "description": description,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(base.source), "model_sha256": base.source_sha256,
        "base": str(base.path), "base_sha256": base.sha256, "base_upcast_from": base.upcast_from,
        "text": str(text), "text_sha256": text_sha256,
        "perplexity": settings,
        "measurement": measurement,
        "fork": {"id": fork.id, "upstream": fork.stamp["pin"], "patches": fork.stamp["applied"]},
        "variants": [r.to_dict() for r in rows],
    }


def load(directory: Path) -> dict:
    """A sweep directory's results.json, checked to be one."""
    path = Path(directory) / FILE
    if Path(directory).is_file():
        raise OrchestrateError(f"{directory} is a file; give the sweep's output directory")
    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise OrchestrateError(f"{path} does not exist (run `orchestrate sweep` first)") from None
    except (OSError, ValueError) as e:
        raise OrchestrateError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else None
        raise OrchestrateError(f"{path} is not a sweep results file (schema {got!r})")
    wrong = _malformed(doc)
    if wrong:
        raise OrchestrateError(f"{path} is damaged: {wrong}")
    return doc


def _fits(value, hint) -> bool:
    """value is of the annotated type (X | None; an int is a float; a bool is neither)."""
    kinds = typing.get_args(hint) or (hint,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _malformed(doc: dict) -> str | None:
    """What is wrong with the parts of a results document the report and `compare` read, or None."""
    if not isinstance(doc.get("variants"), list):
        return "`variants` is not a list"
    for key in ("perplexity", "fork"):
        if not isinstance(doc.get(key), dict):
            return f"`{key}` is missing or not an object"
    if not isinstance(doc.get("description") or "", str):
        return "`description` is not a string"
    for key in ("paired", "tails", "tasks", "measurement", "texts"):
        if not isinstance(doc.get(key) or {}, dict):
            return f"`{key}` is not an object"
    hints = typing.get_type_hints(Row)
    for i, r in enumerate(doc["variants"], 1):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("name", "kind", "status")):
            return f"variant {i} has no name, kind or status"
        bad = next((k for k, v in r.items() if k in hints and not _fits(v, hints[k])), None)
        if bad:
            return f"variant {r['name']}: `{bad}` is {type(r[bad]).__name__}, not {hints[bad]}"
    return None


@contextlib.contextmanager
def locked(directory: Path):
    """Hold the output directory's lock (made if needed), or fail at once in one line. A
    directory made here and still empty when the work fails is removed again."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OrchestrateError(f"output {directory} is a file, not a directory")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OrchestrateError(f"cannot create output directory {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OrchestrateError(f"output directory {directory} is not writable")
    lock_path = directory / LOCK
    lock = filelock.FileLock(str(lock_path))
    if not taken_now(lock):
        raise OrchestrateError(f"another sweep is writing to {directory} (lock {lock_path}); "
                               "wait for it or choose another --out")
    try:
        yield directory
    except BaseException:
        lock.release()
        if created and all(p == lock_path for p in directory.iterdir()):
            lock_path.unlink(missing_ok=True)
            directory.rmdir()
        raise
    lock.release()
