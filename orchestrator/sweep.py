"""Quantize and score every variant of an experiment, resumably, into a results document.

Each variant's artifacts live in a run directory under the cache, keyed by everything
that determines them (base model, fork build, variant, perplexity settings). Every step
writes its output atomically, and result.json is written last, so a run killed at any
moment is finished by the next one and a half-written file is never read as a result.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import filelock

from . import paths
from .assets import write_atomic
from .build import Fork
from .errors import OrchestrateError
from .experiment import Experiment, Variant
from .parse import parse_perplexity
from .quantize import Base, run_quantize
from .runner import Progress, clean_env, failure_reason, run_logged

SCHEMA = "orchestrate.sweep/1"
RUN_FORMAT = 3  # bump when a run directory's contents change, so older runs are not reused


@dataclass(frozen=True)
class Inputs:
    """What every variant of one sweep shares."""
    fork: Fork
    base: Base
    base_id: str
    text: Path
    text_id: str
    ctx: int
    chunks: int
    kld: bool
    threads: int


class StepError(OrchestrateError):
    def __init__(self, message: str, log: Path):
        super().__init__(message)
        self.log = log


def fmt_ppl(v: float) -> str:
    """Perplexities of broken variants reach 1e16: keep those readable."""
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.3e}"


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False).encode())


def read_json(path: Path):
    return json.loads(path.read_text())


def run_key(inp: Inputs, v: Variant) -> str:
    determined_by = {
        "format": RUN_FORMAT, "base": inp.base_id, "fork": inp.fork.id, "variant": v.spec(),
        "perplexity": {"text": inp.text_id, "ctx": inp.ctx, "chunks": inp.chunks, "kld": inp.kld},
    }
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(inp: Inputs, v: Variant) -> Path:
    return paths.cache_dir() / "runs" / f"{v.name}-{run_key(inp, v)}"


def _tail_reason(log: Path) -> str:
    return failure_reason(log.read_text(errors="replace")) if log.exists() else "no output"


def score(inp: Inputs, model: Path, run: Path, kld_base: Path | None = None, save_logits: Path | None = None) -> dict:
    """llama-perplexity on model; returns the parsed figures, the command and the time."""
    cmd = [inp.fork.binary("llama-perplexity"), "-m", model, "-f", inp.text, "-c", str(inp.ctx),
           "-t", str(inp.threads)]
    if inp.chunks:
        cmd += ["--chunks", str(inp.chunks)]
    tmp_logits = None
    if save_logits:
        tmp_logits = save_logits.with_name(f".{save_logits.name}.partial")
        cmd += ["--kl-divergence-base", tmp_logits]
    if kld_base:
        cmd += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    log = run / "perplexity.log"
    with open(log, "w") as f:
        rc, seconds = run_logged(cmd, f, env=clean_env(), cwd=run)
    if rc != 0:
        raise StepError(f"llama-perplexity exited with code {rc}: {_tail_reason(log)}", log)
    try:
        res = parse_perplexity(log.read_text(errors="replace"))
    except OrchestrateError as e:
        raise StepError(str(e), log) from None
    if tmp_logits:
        os.replace(tmp_logits, save_logits)
    res.update(seconds=seconds, command=[str(c) for c in cmd])
    return res


def zero_stats(hist: dict, qtype: str) -> tuple[float | None, float | None]:
    """(share of zero values, share of the zeros that are isolated) for the variant's type."""
    m = hist.get("model", {}).get(qtype.lower())
    if not m or not m["elements"]:
        return None, None
    if m["bins"] == "value":
        zeros = m["values"][-m["bin_min"]]
    else:  # table codes: the code whose level is 0
        levels = hist["config"]["table"]["level"]
        zeros = m["values"][levels.index(0)] if 0 in levels else 0
    isolated = m["zero_runs"][0] / zeros if zeros else None
    return zeros / m["elements"], isolated


def _quantize_step(inp: Inputs, v: Variant, run: Path) -> dict:
    model = run / "model.gguf"
    try:
        res = run_quantize(inp.fork, inp.base.path, model, v.qtype, pablo=v.pablo, radius=v.radius or 0,
                           table=v.table, hist=run / "hist.json", threads=inp.threads, progress=False,
                           log_path=run / "quantize.log")
    except OrchestrateError as e:
        raise StepError(str(e), run / "quantize.log") from None
    res["file_bytes"] = model.stat().st_size
    return res


def run_variant(inp: Inputs, v: Variant, keep_models: bool, kld_base: Path | None, step) -> dict:
    """Bring one variant to a finished result (reusing whatever a previous run finished)."""
    run = run_dir(inp, v)
    run.mkdir(parents=True, exist_ok=True)
    result_path = run / "result.json"
    model = inp.base.path if v.kind == "base" else run / "model.gguf"
    logits = run / "logits.bin" if (inp.kld and v.kind == "base") else None
    lock = filelock.FileLock(str(run / ".lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        step(v, "waiting for another sweep working on it")
        lock.acquire()
    try:
        if result_path.exists() and (logits is None or logits.exists()):
            return read_json(result_path)
        for leftover in list(run.glob(".quantize-*")) + list(run.glob(".*.partial")) + list(run.glob(".*.tmp")):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        qjson, pjson, ajson = run / "quantize.json", run / "perplexity.json", run / "analysis.json"
        needs_model = not pjson.exists() or not ajson.exists()
        if v.kind != "base" and (not qjson.exists() or (needs_model and not model.exists())):
            step(v, "quantize")
            write_json(qjson, _quantize_step(inp, v, run))
        if not ajson.exists():
            step(v, "analyse")
            write_json(ajson, analyse(inp, v, model))
        if not pjson.exists() or (logits is not None and not logits.exists()):
            if inp.kld and v.kind != "base" and (kld_base is None or not kld_base.exists()):
                raise StepError("no KL-divergence base logits (the base variant failed)", run / "perplexity.log")
            step(v, "perplexity")
            write_json(pjson, score(inp, model, run, kld_base=None if v.kind == "base" else kld_base,
                                    save_logits=logits))
        result = assemble(inp, v, run, read_json(qjson) if v.kind != "base" else None, read_json(pjson),
                          read_json(ajson))
        write_json(result_path, result)
        return result
    finally:
        if not keep_models and v.kind != "base" and result_path.exists():
            model.unlink(missing_ok=True)
        lock.release()


def analyse(inp: Inputs, v: Variant, model: Path) -> dict:
    """Compressibility measured from the file, and the damage to each tensor against the base."""
    from .analysis import compressibility, damage, model_stats
    t0 = time.monotonic()
    try:
        out = {**model_stats(model), **compressibility(model, v.qtype or "F16")}
        out["damage"] = None if v.kind == "base" else damage(inp.base.path, model)
    except (OrchestrateError, ValueError) as e:
        raise StepError(f"analysis of {model.name} failed: {e}", model) from None
    out["seconds"] = time.monotonic() - t0
    return out


def assemble(inp: Inputs, v: Variant, run: Path, q: dict | None, p: dict, a: dict) -> dict:
    spec = v.spec()
    row = {"name": v.name, "kind": v.kind, "type": v.qtype or f"base ({'F16 upcast of ' + inp.base.upcast_from if inp.base.upcast_from else 'as given'})",
           "mode": spec["mode"], "radius": v.radius, "table": v.table.name if v.table else None, "status": "ok",
           "ppl": p["ppl"], "ppl_err": p["ppl_err"], "ppl_chunks": p["chunks"]}
    for k in ("kld", "kld_err", "same_top", "same_top_err", "rms_dp", "rms_dp_err"):
        row[k] = p.get(k)
    row.update(file_bytes=q["file_bytes"] if q else inp.base.path.stat().st_size, bpw=a["bpw"],
               elements=a["elements"])
    row["zero_fraction"] = row["isolated_zero_share"] = None
    if q:
        hist = read_json(run / "hist.json")
        row["zero_fraction"], row["isolated_zero_share"] = zero_stats(hist, v.qtype)
    row.update(entropy_bpw=a["entropy_bpw"], rle_bpw=a["rle_bpw"], zstd_bpw=a["zstd_bpw"],
               weight_rel_rmse=a["damage"]["model_rel_rmse"] if a["damage"] else None,
               table_file=str(v.table.path) if v.table else None)
    row.update(quantize_seconds=q["seconds"] if q else 0.0, perplexity_seconds=p["seconds"],
               analysis_seconds=a.get("seconds"),
               commands=([q["command"]] if q else []) + [p["command"]], run_dir=str(run))
    return row


def failed_row(v: Variant, e: StepError | OrchestrateError) -> dict:
    return {"name": v.name, "kind": v.kind, "type": v.qtype, "status": "failed", "reason": str(e),
            "log": str(getattr(e, "log", "")) or None}


class Display:
    """Which variant, which step, and an overall ETA from the variants done so far."""

    def __init__(self, variants: list[Variant]):
        self.n, self.i, self.times, self.t0 = len(variants), 0, [], time.monotonic()
        self.progress = Progress(every=0)

    def step(self, v: Variant, what: str) -> None:
        eta = ""
        if self.times:
            left = (self.n - self.i) * sum(self.times) / len(self.times)
            eta = f"  (ETA {int(left // 60)}m{int(left % 60):02d}s)"
        self.progress.show(f"[{self.i + 1}/{self.n}] {v.name}: {what}{eta}", force=True)

    def finished(self, v: Variant, row: dict, seconds: float, worked: bool) -> None:
        self.i += 1
        if worked:
            self.times.append(seconds)
        if row["status"] == "ok":
            msg = f"{fmt_ppl(row['ppl'])} ± {fmt_ppl(row['ppl_err'])}" + ("" if worked else " (cached)")
        else:
            msg = f"FAILED: {row['reason']}" + (f" (log: {row['log']})" if row.get("log") else "")
        self.progress.done(f"[{self.i}/{self.n}] {v.name}: {msg}")


def fit_tables(variants: list[Variant], inp: Inputs, out: Path) -> list[Variant]:
    """Fit the tables named balanced-fit/optimal to the base's own Q8_0 histogram, and keep
    them as .table files in the sweep directory."""
    from dataclasses import replace

    from .tables import fit, measured_histogram, write_table
    hist = measured_histogram(inp.fork, inp.base.path, inp.base_id, inp.threads)
    done = []
    for v in variants:
        if v.fit:
            note = f"{v.fit} table fitted to the Q8_0 values of {inp.base.path.name} (sha256 {inp.base_id[:16]})"
            v = replace(v, table=write_table(fit(v.fit, hist), out / "tables" / f"{v.fit}.table", note))
        done.append(v)
    return done


def run_sweep(exp: Experiment, inp: Inputs, out: Path, keep_models: bool = False) -> list[dict]:
    """Every variant, in order (the base first: with --kld it provides the logits)."""
    variants = exp.variants()
    fitted_error = None
    if any(v.fit for v in variants):
        try:
            variants = fit_tables(variants, inp, out)
        except OrchestrateError as e:
            fitted_error = e
    display = Display(variants)
    rows = []
    kld_base = None
    for v in variants:
        t0 = time.monotonic()
        worked = []

        def step(var, what):
            worked.append(what)
            display.step(var, what)
        try:
            if v.fit and v.table is None:
                raise OrchestrateError(f"could not fit the {v.fit} table: {fitted_error}")
            row = run_variant(inp, v, keep_models, kld_base, step)
        except OrchestrateError as e:
            row = failed_row(v, e)
        if v.kind == "base" and inp.kld:
            kld_base = run_dir(inp, v) / "logits.bin"
        display.finished(v, row, time.monotonic() - t0, bool(worked))
        rows.append(row)
    return rows


def kld_size_estimate(base: Path, inp_chunks: int, ctx: int) -> int | None:
    """Bytes llama-perplexity will write for the base logits (2 bytes per vocab entry per token)."""
    from .analysis import open_model
    field = open_model(base).get_field("tokenizer.ggml.tokens")
    if field is None or not inp_chunks:
        return None
    return len(field.data) * 2 * (ctx // 2) * inp_chunks


def sweep(exp: Experiment, model: Path | None, text: Path | None, out: Path | None, kld: bool = False,
          keep_models: bool = False, threads: int | None = None, damage_variant: str | None = None) -> tuple[Path, dict]:
    """The main job: build if needed, prepare the base, run every variant, write the report."""
    from . import assets, build, report
    from .fetch import sha256_of
    from .quantize import prepare_base

    model = Path(model) if model else assets.demo_model()
    text = Path(text) if text else assets.demo_text()
    for what, path in (("model", model), ("text", text)):
        if not path.is_file():
            raise OrchestrateError(f"{what} {path} does not exist")
    out = Path(out) if out else paths.plots_dir() / f"{exp.name}-{model.stem}"
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise OrchestrateError(f"another sweep is writing to {out} (lock {out / '.sweep.lock'}); "
                               "wait for it or choose another --out") from None
    try:
        fork = build.build(quiet=False)
        base = prepare_base(model, fork)
        inp = Inputs(fork, base, assets.model_id(base.path), text, sha256_of(text), exp.ctx, exp.chunks, kld,
                     threads or os.cpu_count() or 1)
        if kld:
            size = kld_size_estimate(base.path, exp.chunks, exp.ctx)
            where = paths.cache_dir() / "runs"
            print(f"note: --kld stores the base's logits once ({'about %.1f GB' % (size / 1e9) if size else 'size unknown: all chunks'}) "
                  f"under {where}", flush=True)
        rows = run_sweep(exp, inp, out, keep_models)
        doc = report.results_document(exp, inp, model, rows)
        report.write_all(doc, out, damage_variant)
    finally:
        lock.release()
    return out, doc
