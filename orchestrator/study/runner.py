"""Bring each variant of a study to a finished result, resumably: the per-variant runner and the
local executor (the Ray one is study.cluster).

Every step writes its output atomically, and result.json is written last, so a run killed at any
moment is finished by the next one and a half-written file is never read as a result. A variant that
fails in any way, expected or not, becomes a failed row with its reason and log, and the study goes on.
Where the files live, and what they are called, is study.runs'.
"""

import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import filelock

from ..errors import OrchestrateError, ToolError
from ..files import read_json, taken_now, write_atomic, write_json
from ..results import Row
from ..tools import perplexity
from ..tools.quantize import run_quantize
from . import analysis, groups, plan, stats
from .base import scanned
from .experiment import Variant
from .runs import Inputs, RunDir, ScoreDir, run_dir, score_dir


@dataclass(frozen=True)
class KldBase:
    """The base's logits that --kld variants are scored against, and the base's tensor key."""
    tensors: str
    logits: Path


def _quantize_step(inp: Inputs, v: Variant, run: RunDir, step) -> dict:
    extra = ["--imatrix", str(v.imatrix.path)] if v.imatrix else []
    if v.tensor_types:
        types = dict(v.tensor_types)
        extra += ["--tensor-type-file", str(groups.type_file(tuple(types), types, run.path / "tensor-types.txt"))]
    try:
        res = run_quantize(inp.fork, inp.base.path, run.model, v.qtype, v.hooks, hist=run.hist, threads=inp.threads,
                           extra=extra,
                           progress=False, log_path=run.quantize_log, env=inp.llama_env,
                           on_tensor=lambda k, n: step(v, f"quantize, {k}/{n} tensors", detail=True))
    except OrchestrateError as e:
        raise ToolError(str(e), run.quantize_log) from None
    res["file_bytes"] = run.model.stat().st_size
    return res


def _clear_leftovers(d: Path) -> None:
    """What a killed step left half-written (temporary names only)."""
    for leftover in [*d.glob(".quantize-*"), *d.glob(".*.partial"), *d.glob("*.partial"), *d.glob(".*.tmp")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def take_lock(lock: filelock.FileLock, v: Variant, step) -> filelock.FileLock:
    """lock, acquired: at once, or after saying that another sweep holds it."""
    if not taken_now(lock):
        step(v, "waiting for another sweep working on it")
        lock.acquire()
    return lock


def finished_row(inp: Inputs, v: Variant) -> Row | None:
    """The variant's result in this cache, if it is finished (the base's --kld logits may not be here:
    a cluster node keeps its own)."""
    result = run_dir(inp, v).result
    if not result.exists():
        return None
    row = Row.from_dict(read_json(result))
    sdir = ScoreDir(Path(row.score_dir))
    return row if sdir.scored() and sdir.answered(inp.tasks) else None


def kept_model(inp: Inputs, v: Variant, step) -> RunDir:
    """A finished variant's run directory with its model in it: quantized again when a run that did not
    keep it finished earlier (the same bytes: quantization is deterministic)."""
    run = run_dir(inp, v)
    lock = take_lock(run.lock, v, step)
    try:
        if not run.model.exists():
            step(v, "quantize (again: its model is read)")
            write_json(run.quantize, _quantize_step(inp, v, run, step))
    finally:
        lock.release()
    return run


def scored(inp: Inputs, v: Variant, model: Path, sdir: ScoreDir, kld_base: KldBase | None, step) -> dict:
    """The model's perplexity and per-token scores: from its score directory when a variant with
    the same tensors was already scored, else measured now."""
    base_logits = inp.kld and v.kind == "base"
    sdir.path.mkdir(parents=True, exist_ok=True)
    lock = take_lock(sdir.lock, v, step)
    try:
        if sdir.scored(base_logits):
            return read_json(sdir.perplexity)
        _clear_leftovers(sdir.path)
        if inp.kld and v.kind != "base" and (kld_base is None or not kld_base.logits.exists()):
            raise ToolError("no KL-divergence base logits (the base variant failed)", sdir.log)
        step(v, "perplexity")

        def chunks(progress, elapsed):  # a 7B model's chunk takes minutes: say how far it is
            left = progress.seconds_left(elapsed)
            step(v, f"perplexity, {progress.done}/{progress.total or '?'} chunks"
                    + (f", ~{plan.duration(left)} left" if left is not None else ""), detail=True)
        res = perplexity.run(inp.fork, model, inp.scoring, sdir.log, sdir.scores, inp.llama_env,
                             kld_base=kld_base.logits if kld_base and not base_logits else None,
                             save_logits=sdir.logits if base_logits else None, on_chunks=chunks)
        res["scored_for"] = v.name  # the variant it was measured for; others with its tensors share it
        write_json(sdir.perplexity, res)
        return res
    finally:
        lock.release()


def answered(inp: Inputs, v: Variant, model: Path, sdir: ScoreDir, step) -> None:
    """The model's answers to every task of the study, in its score directory: those still missing
    answered now (answers, like scores, are shared by every variant with the same tensors)."""
    if sdir.answered(inp.tasks):
        return
    lock = take_lock(sdir.lock, v, step)
    try:
        for task in inp.tasks:
            if not sdir.answers(task).exists():
                step(v, f"answer {task.label}")
                write_json(sdir.answers(task), perplexity.answer(inp.fork, model, task, inp.scoring,
                                                                 sdir.answers_log(task), inp.llama_env))
    finally:
        lock.release()


def run_variant(inp: Inputs, v: Variant, keep_models: bool, kld_base: KldBase | None, step) -> Row:
    """Bring one variant to a finished result (reusing whatever a previous run finished)."""
    run = run_dir(inp, v)
    run.path.mkdir(parents=True, exist_ok=True)
    model = inp.base.path if v.kind == "base" else run.model
    base_logits = inp.kld and v.kind == "base"
    lock = take_lock(run.lock, v, step)
    try:
        if run.result.exists():
            result = Row.from_dict(read_json(run.result))
            done = ScoreDir(Path(result.score_dir))
            if done.scored(base_logits) and done.answered(inp.tasks):
                return result
        _clear_leftovers(run.path)
        a = read_json(run.analysis) if run.analysis.exists() else None
        kld_tensors = kld_base.tensors if kld_base else None
        sdir = score_dir(inp, a["tensor_key"], kld_tensors) if a else None
        needs_model = sdir is None or not sdir.scored(base_logits) or not sdir.answered(inp.tasks)
        if v.kind != "base" and (not run.quantize.exists() or (needs_model and not model.exists())):
            step(v, "quantize")
            write_json(run.quantize, _quantize_step(inp, v, run, step))
        if a is None:
            step(v, "analyse")
            a = analyse(inp, v, model, run)
            write_json(run.analysis, a)
        sdir = score_dir(inp, a["tensor_key"], kld_tensors)
        p = scored(inp, v, model, sdir, kld_base, step)
        answered(inp, v, model, sdir, step)
        result = assemble(inp, v, run, read_json(run.quantize) if v.kind != "base" else None, p, a, sdir)
        write_json(run.result, result.to_dict())
        return result
    finally:
        if not keep_models and v.kind != "base" and run.result.exists():
            analysis.release(model)  # unmapped first, so the disk space is freed at once
            model.unlink(missing_ok=True)
        lock.release()


def analyse(inp: Inputs, v: Variant, model: Path, run: RunDir) -> dict:
    """The model's tensor key and zstd size (one read of the file); the coded sizes of its values and
    the damage to each tensor, from what the hooks measured while quantizing."""
    t0 = time.monotonic()
    try:
        out = analysis.model_stats(model)
        if v.kind == "base":
            out.update(scanned(inp.base), entropy_bpw=None, rle_bpw=None, damage=None)
        else:
            hooks = read_json(run.hist)
            out.update(analysis.scan(model), **stats.coded_sizes(hooks, out["main_type"]))
            out["damage"] = stats.damage(inp.base.path, model, hooks)
    except OrchestrateError as e:
        raise ToolError(f"analysis of {model.name} failed: {e}", model) from None
    out["seconds"] = time.monotonic() - t0
    return out


def assemble(inp: Inputs, v: Variant, run: RunDir, q: dict | None, p: dict, a: dict, sdir: ScoreDir) -> Row:
    """The variant's row, from its quantization (None for the base), score and analysis."""
    zeros = stats.zero_stats(read_json(run.hist), a.get("main_type")) if q else (None, None)
    upcast = f"F16 upcast of {inp.base.upcast_from}" if inp.base.upcast_from else "as given"
    return Row(name=v.name, kind=v.kind, type=v.qtype or f"base ({upcast})", main_type=a.get("main_type"),
               tensor_types=a.get("types"), mode=v.spec()["mode"], radius=v.radius,
               table=v.table.name if v.table else None, status="ok",
               ppl=p["ppl"], ppl_err=p["ppl_err"], ppl_chunks=p["chunks"], scored_for=p["scored_for"],
               **{k: p.get(k) for k in ("kld", "kld_err", "same_top", "same_top_err", "rms_dp", "rms_dp_err")},
               file_bytes=q["file_bytes"] if q else inp.base.path.stat().st_size, bpw=a["bpw"],
               elements=a["elements"], zero_fraction=zeros[0], isolated_zero_share=zeros[1],
               entropy_bpw=a["entropy_bpw"], rle_bpw=a["rle_bpw"], zstd_bpw=a["zstd_bpw"],
               zstd_sampled=a["zstd_sampled"],
               weight_rel_rmse=a["damage"]["model_rel_rmse"] if a["damage"] else None,
               quantize_seconds=q["seconds"] if q else 0.0, perplexity_seconds=p["seconds"],
               analysis_seconds=a.get("seconds"), commands=([q["command"]] if q else []) + [p["command"]]
               + [read_json(sdir.answers(t))["command"] for t in inp.tasks],
               run_dir=str(run.path), tensor_key=a["tensor_key"], score_dir=str(sdir.path),
               scores_file=str(sdir.scores))


def failed_row(v: Variant, reason: str, log: Path | None) -> Row:
    return Row(name=v.name, kind=v.kind, type=v.qtype, status="failed", reason=reason, log=str(log) if log else None)


def unexpected_failure(inp: Inputs, v: Variant, e: Exception) -> Row:
    """A failed row for an error nobody foresaw, with the full trace kept in the run directory."""
    log = run_dir(inp, v).error_log
    write_atomic(log, "".join(traceback.format_exception(e)))
    return failed_row(v, f"internal error: {type(e).__name__}: {e}", log)


def finish_row(v: Variant, row: Row) -> Row:
    """Where this sweep found the table (a cached run may have had its twin elsewhere)."""
    return row.but(table_file=str(v.table.path) if v.table else None)


def run_local(variants: list[Variant], inp: Inputs, keep_models: bool, display, unfit: dict, record) -> list[Row]:
    """Every variant in turn, in this process (the base first: with --kld it provides the logits).
    record(row) notes each finished variant's use in the cache."""
    rows = []
    kld_base = None
    for v in variants:
        t0 = time.monotonic()
        worked = []

        def step(var, what, detail=False):
            worked.append(what)
            display.step(var, what, detail)
        try:
            if v.name in unfit:
                raise OrchestrateError(unfit[v.name])
            row = finish_row(v, run_variant(inp, v, keep_models, kld_base, step))
        except OrchestrateError as e:  # (a tool's failure keeps its log)
            row = failed_row(v, str(e), getattr(e, "log", None))
        except Exception as e:  # a bug must cost one variant, not the sweep
            row = unexpected_failure(inp, v, e)
        if v.kind == "base" and inp.kld and row.status == "ok":
            kld_base = KldBase(row.tensor_key, ScoreDir(Path(row.score_dir)).logits)
        record(row)
        display.finished(v, row, time.monotonic() - t0, bool(worked))
        rows.append(row)
    return rows
