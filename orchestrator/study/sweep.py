"""Quantize and score every variant of an experiment, resumably, into a results document.

Each variant's artifacts live in a run directory under the cache, keyed by everything
that determines them (base model, fork build, variant, perplexity settings, the user's
--llama-env). Its perplexity lives in a score directory keyed by what the model computes
with (its tensors' content), the text and the settings: variants whose tensors are
byte-identical (stock Q4_0 and radius 0) are scored once. Every step writes its output
atomically, and result.json is written last, so a run killed at any moment is finished by
the next one and a half-written file is never read as a result. A variant that fails in
any way, expected or not, becomes a failed row with its reason and log, and the sweep goes on.
"""

import functools
import gc
import hashlib
import json
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import filelock

from .. import paths, results
from ..errors import OrchestrateError
from ..files import check_input_file, read_json, read_text, write_atomic, write_json
from ..fork.build import Fork
from ..hooks.quantize import run_quantize
from ..parse import PerplexityProgress, parse_perplexity
from ..proc import Progress, clean_env, failure_reason, run_logged
from . import analysis, cache, paired, plan, scores, stats
from .base import Base, scanned
from .experiment import Experiment, Variant

ALL_LAYERS = 999  # -ngl for "every layer on the GPU"
RUN_FORMAT = 8  # bump when a run or score directory's contents change, so older ones are not reused


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


class StepError(OrchestrateError):
    def __init__(self, message: str, log: Path):
        super().__init__(message)
        self.log = log


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


def run_dir(inp: Inputs, v: Variant) -> Path:
    return inp.cache / "runs" / f"{v.name}-{run_key(inp, v)}"


@dataclass(frozen=True)
class KldBase:
    """The base's logits that --kld variants are scored against, and the base's tensor key."""
    tensors: str
    logits: Path


def score_dir(inp: Inputs, tensors: str, kld_base_tensors: str | None) -> Path:
    """Where a model with these tensors is scored: the same for every variant that has them.
    kld_base_tensors: the tensor key of the base whose logits a --kld variant is scored against."""
    return inp.cache / "scores" / _key(inp, {"tensors": tensors, "kld_base": kld_base_tensors})


def _tail_reason(log: Path) -> str:
    return failure_reason(read_text(log)) if log.exists() else "no output"


def perplexity_command(inp: Inputs, model: Path, chunks: int | None = None) -> list:
    """llama-perplexity on model with the sweep's settings (chunks: other than the sweep's)."""
    chunks = inp.chunks if chunks is None else chunks
    cmd = [inp.fork.binary("llama-perplexity"), "-m", model, "-f", inp.text, "-c", str(inp.ctx),
           "-t", str(inp.threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if inp.gpu_layers is not None:
        cmd += ["-ngl", str(inp.gpu_layers)]
    return cmd


def score(inp: Inputs, model: Path, run: Path, kld_base: Path | None = None, save_logits: Path | None = None,
          on_chunks: Callable[[PerplexityProgress, float], None] | None = None) -> dict:
    """llama-perplexity on model, writing run/scores.bin (per-token scores); returns the parsed
    figures, the command and the time. on_chunks(progress, seconds so far) as chunks are done."""
    cmd = perplexity_command(inp, model)
    tmp_logits = None
    if save_logits:
        tmp_logits = save_logits.with_name(f".{save_logits.name}.partial")
        cmd += ["--kl-divergence-base", tmp_logits]
    if kld_base:
        cmd += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    log = run / "perplexity.log"
    chunks, t0 = PerplexityProgress(), time.monotonic()

    def output(text):
        if chunks.feed(text) and on_chunks:
            on_chunks(chunks, time.monotonic() - t0)
    with open(log, "w", encoding="utf-8") as f:
        rc, seconds = run_logged(cmd, f, env={**clean_env(inp.llama_env), scores.ENV: str(run / "scores.bin")},
                                 cwd=run, on_output=output)
    if rc != 0:
        raise StepError(f"llama-perplexity exited with code {rc}: {_tail_reason(log)}", log)
    try:
        res = parse_perplexity(read_text(log))
    except OrchestrateError as e:
        raise StepError(str(e), log) from None
    if not (run / "scores.bin").exists():
        raise StepError(f"llama-perplexity wrote no per-token scores: {_tail_reason(log)}", log)
    if tmp_logits:
        os.replace(tmp_logits, save_logits)
    res.update(seconds=seconds, command=[str(c) for c in cmd])
    return res


def _quantize_step(inp: Inputs, v: Variant, run: Path, step) -> dict:
    model = run / "model.gguf"
    try:
        res = run_quantize(inp.fork, inp.base.path, model, v.qtype, pablo=v.pablo, radius=v.radius or 0,
                           table=v.table, hist=run / "hist.json", threads=inp.threads, progress=False,
                           log_path=run / "quantize.log", env=inp.llama_env,
                           on_tensor=lambda k, n: step(v, f"quantize, {k}/{n} tensors", detail=True))
    except OrchestrateError as e:
        raise StepError(str(e), run / "quantize.log") from None
    res["file_bytes"] = model.stat().st_size
    return res


def _clear_leftovers(d: Path) -> None:
    """What a killed step left half-written (temporary names only)."""
    for leftover in [*d.glob(".quantize-*"), *d.glob(".*.partial"), *d.glob("*.partial"), *d.glob(".*.tmp")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def take_lock(path: Path, v: Variant, step) -> filelock.FileLock:
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        step(v, "waiting for another sweep working on it")
        lock.acquire()
    return lock


def finished_row(inp: Inputs, v: Variant) -> dict | None:
    """The variant's result in this cache, if it is finished (the base's --kld logits may not be here:
    a cluster node keeps its own)."""
    result = run_dir(inp, v) / "result.json"
    if not result.exists():
        return None
    row = read_json(result)
    return row if _scored(Path(row["score_dir"]), logits=False) else None


def _scored(sdir: Path, logits: bool) -> bool:
    return (sdir / "perplexity.json").exists() and (not logits or (sdir / "logits.bin").exists())


def scored(inp: Inputs, v: Variant, model: Path, sdir: Path, kld_base: KldBase | None, step) -> dict:
    """The model's perplexity and per-token scores: from its score directory when a variant with
    the same tensors was already scored, else measured now."""
    base_logits = inp.kld and v.kind == "base"
    sdir.mkdir(parents=True, exist_ok=True)
    lock = take_lock(sdir / ".lock", v, step)
    try:
        if _scored(sdir, base_logits):
            return read_json(sdir / "perplexity.json")
        _clear_leftovers(sdir)
        if inp.kld and v.kind != "base" and (kld_base is None or not kld_base.logits.exists()):
            raise StepError("no KL-divergence base logits (the base variant failed)", sdir / "perplexity.log")
        step(v, "perplexity")

        def chunks(progress, elapsed):  # a 7B model's chunk takes minutes: say how far it is
            left = progress.seconds_left(elapsed)
            step(v, f"perplexity, {progress.done}/{progress.total or '?'} chunks"
                    + (f", ~{plan.duration(left)} left" if left is not None else ""), detail=True)
        res = score(inp, model, sdir, kld_base=kld_base.logits if kld_base and not base_logits else None,
                    save_logits=sdir / "logits.bin" if base_logits else None, on_chunks=chunks)
        res["scored_for"] = v.name  # the variant it was measured for; others with its tensors share it
        write_json(sdir / "perplexity.json", res)
        return res
    finally:
        lock.release()


def run_variant(inp: Inputs, v: Variant, keep_models: bool, kld_base: KldBase | None, step) -> dict:
    """Bring one variant to a finished result (reusing whatever a previous run finished)."""
    run = run_dir(inp, v)
    run.mkdir(parents=True, exist_ok=True)
    result_path = run / "result.json"
    model = inp.base.path if v.kind == "base" else run / "model.gguf"
    base_logits = inp.kld and v.kind == "base"
    lock = take_lock(run / ".lock", v, step)
    try:
        if result_path.exists():
            result = read_json(result_path)
            if _scored(Path(result["score_dir"]), base_logits):
                return result
        _clear_leftovers(run)
        qjson, ajson = run / "quantize.json", run / "analysis.json"
        a = read_json(ajson) if ajson.exists() else None
        kld_tensors = kld_base.tensors if kld_base else None
        needs_model = a is None or not _scored(score_dir(inp, a["tensor_key"], kld_tensors), base_logits)
        if v.kind != "base" and (not qjson.exists() or (needs_model and not model.exists())):
            step(v, "quantize")
            write_json(qjson, _quantize_step(inp, v, run, step))
        if a is None:
            step(v, "analyse")
            a = analyse(inp, v, model)
            write_json(ajson, a)
        sdir = score_dir(inp, a["tensor_key"], kld_tensors)
        p = scored(inp, v, model, sdir, kld_base, step)
        result = assemble(inp, v, run, read_json(qjson) if v.kind != "base" else None, p, a)
        result.update(tensor_key=a["tensor_key"], score_dir=str(sdir), scores_file=str(sdir / "scores.bin"))
        write_json(result_path, result)
        return result
    finally:
        if not keep_models and v.kind != "base" and result_path.exists():
            analysis.release(model)  # unmapped first, so the disk space is freed at once
            model.unlink(missing_ok=True)
        lock.release()


def analyse(inp: Inputs, v: Variant, model: Path) -> dict:
    """The model's tensor key and zstd size (one read of the file); the coded sizes of its values and
    the damage to each tensor, from what the hooks measured while quantizing."""
    t0 = time.monotonic()
    try:
        out = analysis.model_stats(model)
        if v.kind == "base":
            out.update(scanned(inp.base), entropy_bpw=None, rle_bpw=None, damage=None)
        else:
            hooks = read_json(model.parent / "hist.json")
            out.update(analysis.scan(model), **stats.coded_sizes(hooks, out["main_type"]))
            out["damage"] = stats.damage(inp.base.path, model, hooks)
    except OrchestrateError as e:
        raise StepError(f"analysis of {model.name} failed: {e}", model) from None
    out["seconds"] = time.monotonic() - t0
    return out


def assemble(inp: Inputs, v: Variant, run: Path, q: dict | None, p: dict, a: dict) -> dict:
    spec = v.spec()
    row = {"name": v.name, "kind": v.kind, "type": v.qtype or f"base ({'F16 upcast of ' + inp.base.upcast_from if inp.base.upcast_from else 'as given'})",
           "main_type": a.get("main_type"), "tensor_types": a.get("types"),
           "mode": spec["mode"], "radius": v.radius, "table": v.table.name if v.table else None, "status": "ok",
           "ppl": p["ppl"], "ppl_err": p["ppl_err"], "ppl_chunks": p["chunks"], "scored_for": p["scored_for"]}
    for k in ("kld", "kld_err", "same_top", "same_top_err", "rms_dp", "rms_dp_err"):
        row[k] = p.get(k)
    row.update(file_bytes=q["file_bytes"] if q else inp.base.path.stat().st_size, bpw=a["bpw"],
               elements=a["elements"])
    row["zero_fraction"] = row["isolated_zero_share"] = None
    if q:
        row["zero_fraction"], row["isolated_zero_share"] = stats.zero_stats(read_json(run / "hist.json"),
                                                                             a.get("main_type"))
    row.update(entropy_bpw=a["entropy_bpw"], rle_bpw=a["rle_bpw"], zstd_bpw=a["zstd_bpw"], zstd_sampled=a["zstd_sampled"],
               weight_rel_rmse=a["damage"]["model_rel_rmse"] if a["damage"] else None)
    row.update(quantize_seconds=q["seconds"] if q else 0.0, perplexity_seconds=p["seconds"],
               analysis_seconds=a.get("seconds"),
               commands=([q["command"]] if q else []) + [p["command"]], run_dir=str(run))
    return row


def failed_row(v: Variant, reason: str, log: Path | None) -> dict:
    return {"name": v.name, "kind": v.kind, "type": v.qtype, "status": "failed", "reason": reason,
            "log": str(log) if log else None}


def unexpected_failure(inp: Inputs, v: Variant, e: Exception) -> dict:
    """A failed row for an error nobody foresaw, with the full trace kept in the run directory."""
    log = run_dir(inp, v) / "error.log"
    write_atomic(log, "".join(traceback.format_exception(e)))
    return failed_row(v, f"internal error: {type(e).__name__}: {e}", log)


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
            eta = f"  (ETA {plan.duration((self.n - self.i) * sum(self.times) / len(self.times))})"
        self.progress.show(f"[{self.i + 1}/{self.n}] {v.name}: {what}{eta}", force=not detail)

    def cluster(self, running: str, left: int, parallel: int) -> None:
        """What runs where (from the cluster's tasks), and an ETA for the variants left."""
        eta = ""
        if self.times:
            eta = f"  (ETA {plan.duration(left * sum(self.times) / len(self.times) / parallel)} at {parallel} at a time)"
        shape = re.sub(r" \d+s\b", "", running)  # without the seconds: a log gets a line per change only
        if self.progress.tty or shape != self.shape:
            self.shape = shape
            self.progress.show(f"[{self.i}/{self.n} done] running: {running or 'waiting for the cluster'}{eta}",
                               force=True)

    def finished(self, v: Variant, row: dict, seconds: float, worked: bool) -> None:
        self.i += 1
        if worked:
            self.times.append(seconds)
        if row["status"] == "ok":
            msg = f"{results.fmt_ppl(row['ppl'])} ± {results.fmt_ppl(row['ppl_err'])}" + ("" if worked else " (cached)")
            if row.get("scored_for") not in (None, row["name"]):
                msg += f" (same tensors as {row['scored_for']}: scored once)"
        else:
            msg = f"FAILED: {row['reason']}" + (f" (log: {row['log']})" if row.get("log") else "")
        self.progress.done(f"[{self.i}/{self.n}] {v.name}: {msg}")


def fit_tables(variants: list[Variant], inp: Inputs, out: Path) -> list[Variant]:
    """Fit the tables named balanced-fit/optimal to the base's own Q8_0 histogram, and keep
    them as .table files in the sweep directory."""
    from dataclasses import replace

    from ..hooks.tables import fit, measured_histogram, write_table
    hist = measured_histogram(inp.fork, inp.base.path, inp.base.sha256, inp.threads)
    done = []
    for v in variants:
        if v.fit:
            note = f"{v.fit} table fitted to the Q8_0 values of {inp.base.path.name} (sha256 {inp.base.sha256[:16]})"
            v = replace(v, table=write_table(fit(v.fit, hist), out / "tables" / f"{v.fit}.table", note))
        done.append(v)
    return done


def prepared(exp: Experiment, inp: Inputs, out: Path) -> tuple[list[Variant], dict[str, str]]:
    """The experiment's variants with their fitted tables, and why a table could not be fitted."""
    variants = exp.variants()
    if not any(v.fit for v in variants):
        return variants, {}
    try:
        return fit_tables(variants, inp, out), {}
    except OrchestrateError as e:
        return variants, {v.name: f"could not fit the {v.fit} table: {e}" for v in variants if v.fit}


def finish_row(v: Variant, row: dict) -> dict:
    """Where this sweep found the table (a cached run may have had its twin elsewhere)."""
    return {**row, "table_file": str(v.table.path) if v.table else None}


def run_local(variants: list[Variant], inp: Inputs, keep_models: bool, display, unfit: dict, record) -> list[dict]:
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
        except OrchestrateError as e:
            row = failed_row(v, str(e), getattr(e, "log", None))
        except Exception as e:  # a bug must cost one variant, not the sweep
            row = unexpected_failure(inp, v, e)
        if v.kind == "base" and inp.kld and row["status"] == "ok":
            kld_base = KldBase(row["tensor_key"], Path(row["score_dir"]) / "logits.bin")
        record(row)
        display.finished(v, row, time.monotonic() - t0, bool(worked))
        rows.append(row)
    return rows


def run_sweep(exp: Experiment, inp: Inputs, out: Path, keep_models: bool = False, execute=run_local) -> list[dict]:
    """Every variant of the experiment, with an executor: run_local, or cluster.run (Ray)."""
    variants, unfit = prepared(exp, inp, out)
    return execute(variants, inp, keep_models, Display(variants), unfit, functools.partial(cache.record, sweep=out))


def kld_size_estimate(base: Path, inp_chunks: int, ctx: int) -> int | None:
    """Bytes llama-perplexity will write for the base logits (2 bytes per vocab entry per token)."""
    tokens = analysis.open_model(base).get_field("tokenizer.ggml.tokens")
    if tokens is None or not inp_chunks:
        return None
    return analysis.array_length(tokens) * 2 * (ctx // 2) * inp_chunks


def default_reference(names: list[str]) -> str | None:
    """Stock Q4_0 when the sweep has it: the same 4 bits of information as the hooked variants."""
    return "q4_0" if "q4_0" in names else None


def compare_all(rows: list[dict], reference: str | None) -> dict:
    """Paired statistics over every variant that was scored (study.paired.study)."""
    ok = [r for r in rows if r["status"] == "ok"]
    try:
        found = {r["name"]: scores.read(Path(r["scores_file"])) for r in ok}
        base = next((r["name"] for r in ok if r["kind"] == "base"), None)
        return paired.study(found, base, reference if reference in found else None)
    except OrchestrateError as e:
        return {"error": str(e)}


def sweep(exp: Experiment, model: Path | None, text: Path | None, out: Path | None, kld: bool = False,
          keep_models: bool = False, threads: int | None = None, damage_variant: str | None = None,
          llama_env: dict | None = None, reference: str | None = None, execute=run_local,
          force: bool = False, backend: str = "cpu", gpu_layers: int | None = None) -> tuple[Path, dict]:
    """The main job: build if needed, prepare the base, run every variant, write the report."""
    from ..fork import build
    from ..hooks.quantize import canonical_type, needs_imatrix
    from ..report import report
    from .base import prepare_base

    gc.freeze()  # what is imported by now (matplotlib: ~80k objects) lives on: out of every collection
    model, text = _inputs(model, text)
    out = Path(out) if out else paths.plots_dir() / f"{exp.name}-{model.stem}"
    names = [v.name for v in exp.variants()]
    if reference is not None and reference not in names:
        raise OrchestrateError(f"--reference {reference}: no such variant in {exp.name} "
                               f"(variants: {', '.join(names)})")
    reference = reference or default_reference(names)
    with results.locked(out):
        fork = build.build(quiet=False, backend=backend)
        exp = exp.with_types(lambda t: canonical_type(fork, t))
        base = prepare_base(model, fork)
        need = [t for t in exp.types if needs_imatrix(fork, base.path, base.sha256, t)]
        if need:
            raise OrchestrateError(f"{', '.join(need)} need{'s' if len(need) == 1 else ''} an importance matrix "
                                   f"for {model.name} (llama-quantize decides this per tensor); "
                                   "orchestrate does not pass one: leave out " + ", ".join(need))
        inp = _sweep_inputs(fork, base, text, exp, kld, threads, llama_env, gpu_layers)
        if kld:
            size = kld_size_estimate(base.path, exp.chunks, exp.ctx)
            where = inp.cache / "scores"
            print(f"note: --kld stores the base's logits once ({'about %.1f GB' % (size / 1e9) if size else 'size unknown: all chunks'}) "
                  f"under {where}", flush=True)
        if execute is run_local:  # (on a cluster, models and logits go to the workers' disks)
            todo = [v for v in exp.variants() if not finished_row(inp, v)]
            need = _disk_need(inp, model, todo, keep_models, base.path.stat().st_size, 0, plan.history(inp.cache))
            plan.refuse_if_too_big(need, inp.cache, force)
        rows = run_sweep(exp, inp, out, keep_models, execute)
        settings = {"ctx": inp.ctx, "chunks": inp.chunks, "kld": inp.kld, "threads": inp.threads,
                    "llama_env": inp.llama_env}
        doc = results.document(exp.name, exp.description, base, inp.text, inp.text_id, settings, fork, rows)
        doc["paired"] = compare_all(rows, reference)
        report.write_all(doc, out, damage_variant)
    return out, doc


def _sweep_inputs(fork: Fork, base: Base, text: Path, exp: Experiment, kld: bool, threads: int | None,
                  llama_env: dict | None, gpu_layers: int | None) -> Inputs:
    """A sweep's Inputs from its options (the same for running it and for planning it)."""
    from ..fetch import sha256_of
    return Inputs(fork, base, text.resolve(), sha256_of(text), exp.ctx, exp.chunks, kld, threads or os.cpu_count() or 1,
                  dict(llama_env or {}), gpu_layers=_gpu_layers(fork, gpu_layers))


def _gpu_layers(fork: Fork, asked: int | None) -> int | None:
    """-ngl for llama-perplexity: as asked, else every layer on a GPU backend, else not passed."""
    return asked if asked is not None else (ALL_LAYERS if fork.gpu else None)


def _inputs(model: Path | None, text: Path | None) -> tuple[Path, Path]:
    """The model and text a sweep uses (the demo's by default), checked to be files."""
    from .. import demo
    for what, given in (("model", model), ("text", text)):  # the user's, before fetching any default
        if given:
            check_input_file(given, what)
    return (check_input_file(model or demo.demo_model(), "model"), check_input_file(text or demo.demo_text(), "text"))


def _chunks(inp: Inputs) -> int:
    """Chunks that will be scored (a whole text's from its size when --chunks 0)."""
    return inp.chunks or max(1, inp.text.stat().st_size // plan.CHARS_PER_TOKEN // inp.ctx)


def _disk_need(inp: Inputs, model: Path, todo: list[Variant], keep_models: bool, base_bytes: int, upcast: int,
               hist: plan.History) -> plan.Need:
    """The peak disk of the variants still to run (the base's --kld logits when the base is one of them)."""
    base_todo = inp.kld and any(v.kind == "base" for v in todo)
    logits = (kld_size_estimate(model, _chunks(inp), inp.ctx) or 0) if base_todo else 0
    return plan.disk_need(base_bytes, [v.qtype for v in todo if v.kind != "base"], keep_models, logits, upcast, hist)


def plan_sweep(exp: Experiment, model: Path | None, text: Path | None, kld: bool = False, keep_models: bool = False,
               threads: int | None = None, llama_env: dict | None = None, backend: str = "cpu",
               gpu_layers: int | None = None) -> list[str]:
    """`sweep --plan`: the variants, which are cached, the disk at the peak against the free space,
    and the time, without running the sweep (at most a one-chunk calibration of the base)."""
    from ..fork import build
    from dataclasses import replace

    from ..hooks.quantize import canonical_type
    from ..hooks.tables import cached_histogram, fit
    from .base import file_id, needs_upcast, prepare_base, upcast_path
    model, text = _inputs(model, text)
    fork = build.current(backend)
    exp = exp.with_types(lambda t: canonical_type(fork, t))
    params = plan.model_params(model)
    upcast = 2 * params if needs_upcast(model) else 0
    if upcast:  # a stand-in: no run of it exists, and nothing is made here
        sha = file_id(model)
        base = Base(upcast_path(model, sha), "", (), model.resolve(), sha, "quantized")
    else:
        base = prepare_base(model, fork)
    inp = _sweep_inputs(fork, base, text, exp, kld, threads, llama_env, gpu_layers)
    variants = exp.variants()
    fitted_from = None if upcast else cached_histogram(fork, base.sha256)
    if fitted_from is not None:  # the tables the sweep will fit (a pure computation): their runs are known
        variants = [replace(v, table=fit(v.fit, fitted_from)) if v.fit else v for v in variants]
    states = {v.name: "cached" if finished_row(inp, v) else "to run" for v in variants}
    hist = plan.history(inp.cache)
    calibrated, near = None, plan.near_rates(hist, params)
    if not near and not upcast:
        print("note: no earlier runs on a model of this size to time by: one chunk of the base is run to calibrate",
              flush=True)
        calibrated = plan.calibrate(perplexity_command(inp, base.path, chunks=1), inp.ctx, params, inp.llama_env)
    base_bytes = upcast or base.path.stat().st_size
    tokens = _chunks(inp) * inp.ctx
    rows = [(v.name, states[v.name], *plan.estimate(v.qtype, base_bytes / 2 ** 20, tokens, params, hist, calibrated))
            for v in variants]
    if upcast:
        rows.insert(0, ("(F16 upcast)", "to make", plan.estimate("F16", base_bytes / 2 ** 20, 0, params, hist, None)[0], 0.0))
    todo = [v for v in variants if states[v.name] != "cached"]
    need = _disk_need(inp, model, todo, keep_models, base_bytes, upcast, hist)
    header = (f"plan: {exp.name} on {model.name}: {len(variants)} variants, {len(todo)} to run; {inp.text.name}, "
              f"-c {inp.ctx}, {inp.chunks or f'all (about {_chunks(inp)})'} chunks, {inp.threads} threads")
    source = (f"perplexity timed from {sum(map(len, near.values()))} earlier runs here on models of about this size"
              if near else "perplexity timed by a one-chunk calibration of the base" if calibrated else
              "perplexity timed from earlier runs on models of another size (rough)" if hist.perplexity else
              "no perplexity timing yet")
    source += f", quantize from {sum(map(len, hist.quantize.values()))} earlier runs"
    return plan.render(header, rows, need, keep_models, inp.cache, source)
