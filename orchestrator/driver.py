"""The entry points of a study — a sweep, and its plan — above the study (runs and measurements) and
the report (figures and text from results.json). The only module that uses both.

A sweep and its plan share one preparation of their inputs (the fork, the experiment's types as
llama-quantize spells them, the base, the text checked against what is asked of it); the plan
stops there and estimates, the sweep runs every variant and hands results.json to the report.
"""

import functools
import gc
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from . import paths, recipes, results, scans, texts
from .errors import OrchestrateError
from .fetch import sha256_of
from .files import check_input_file, read_json
from .fork import build
from .fork.build import Fork
from .hooks.conf import Hooks, rule_arg, write_conf
from .hooks.tables import FITTED, fit
from .study import analysis, answers, cache, fitting, groups, paired, plan, recipe as recipe_mod, runs, scan as scan_mod
from .study import scores, sequential, stats, tails
from .study.base import Base, cached_histogram, file_id, needs_upcast, prepare_base, upcast_path
from .study.display import Display
from .study.experiment import Experiment, RuleSet, Variant
from .study.runner import finished_row, kept_model, run_local
from .study.runs import Inputs, ScoreDir
from .tools import imatrix, perplexity, tokenize
from .tools.imatrix import Imatrix
from .tools.quantize import canonical_type, needs_imatrix, planned_types

logger = logging.getLogger(__name__)
ALL_LAYERS = 999  # -ngl for "every layer on the GPU"
BATCH = 2048      # llama-perplexity's default -b: it scores BATCH // ctx chunks together


@dataclass(frozen=True)
class Options:
    """How the user asked a study to run (beyond the experiment itself)."""
    kld: bool = False
    keep_models: bool = False
    threads: int | None = None
    llama_env: dict | None = None
    backend: str = "cpu"
    gpu_layers: int | None = None
    split: float | None = None   # fit on this share of the text, score the rest (texts.split)


@dataclass(frozen=True)
class Prepared:
    exp: Experiment          # its types as llama-quantize spells them
    model: Path              # the user's model
    inp: Inputs
    upcast: int              # bytes of an F16 upcast still to make (plan only; 0 when the base exists)
    chunks: int              # chunks llama-perplexity will score


def model_and_text(model: Path | None, text: Path | None) -> tuple[Path, Path]:
    """The model and text of a study (the demo's by default), checked to be readable files."""
    from . import demo
    for what, given in (("model", model), ("text", text)):  # the user's, before fetching any default
        if given:
            check_input_file(given, what)
    return (check_input_file(model or demo.demo_model(), "model"), check_input_file(text or demo.demo_text(), "text"))


def _parts(text: Path, exp: Experiment, opts: Options) -> tuple[Path, texts.Part | None, texts.Part | None]:
    """The text a sweep scores, and the fitting and scoring parts when the text is split: as asked, or in
    half when an importance matrix is made (on text the sweep does not score)."""
    split = opts.split if opts.split is not None else (0.5 if exp.imatrix else None)
    if split is None:
        return text, None, None
    fit_part, score_part = texts.split(text, split)
    return score_part.path, fit_part, score_part


def text_record(inp: Inputs, variants: list[Variant], fit_part: texts.Part | None,
                score_part: texts.Part | None, im: Imatrix | None = None) -> dict:
    """Which text scored this sweep, and what was fitted on what (results.json's texts)."""
    fits = []
    if im is not None:
        fits.append({"for": f"Fitted the importance matrix `{im.path.name}`",
                     **texts.record(im.text, im.text_sha256, fit_part)})
    fitted = sorted({v.fit for v in variants if v.fit})
    if fitted:
        fits.append({"for": f"Fitted the tables {', '.join(fitted)}", "from": "the base's Q8_0 weights (no text)"})
    if fit_part and im is None:
        fits.append({"for": "Held back for fitting (nothing in this sweep fits on text)",
                     **texts.record(fit_part.path, fit_part.sha256, fit_part)})
    return {"score": texts.record(inp.text, inp.text_id, score_part), "fit": fits,
            "tasks": [{"task": t.label, "file": str(t.path), "sha256": t.sha256} for t in inp.tasks]}


def prepare(exp: Experiment, model: Path, text: Path, opts: Options, fork: Fork, make_base: bool) -> Prepared:
    """Everything a sweep or a plan checks before work, on the model and text _files found. make_base:
    make the base's F16 upcast if needed (a plan does not: it stands in a Base for it, which no run of
    exists)."""
    exp = exp.with_types(lambda t: canonical_type(fork, t))
    upcast = 0
    if not make_base and needs_upcast(model):
        sha = file_id(model)
        upcast = 2 * plan.model_params(model)
        base = Base(upcast_path(model, sha), "", (), model.resolve(), sha, "quantized")
    else:
        base = prepare_base(model, fork)
    gpu_layers = opts.gpu_layers if opts.gpu_layers is not None else (ALL_LAYERS if fork.gpu else None)
    inp = Inputs(fork, base, text.resolve(), sha256_of(text), exp.ctx, exp.chunks, opts.kld,
                 opts.threads or os.cpu_count() or 1, dict(opts.llama_env or {}), gpu_layers=gpu_layers,
                 tasks=exp.tasks)
    tokens = tokenize.count_tokens(fork, model, file_id(model), text, inp.text_id)  # the source's vocabulary
    chunks = tokenize.check_text(tokens, exp.ctx, exp.chunks, text)
    if chunks < paired.MIN_CHUNKS:
        logger.info("note: %s gives %d chunk%s at -c %d: too few for paired intervals (%d needed); perplexities "
                 "are still measured", text.name, chunks, "s" if chunks != 1 else "", exp.ctx, paired.MIN_CHUNKS)
    return Prepared(exp, model, inp, upcast, chunks)


def _check_imatrix(p: Prepared) -> set[str]:
    """The types that need an importance matrix; an error when some do and the study has none."""
    need = [t for t in p.exp.types if needs_imatrix(p.inp.fork, p.inp.base.path, p.inp.base.sha256, t)]
    if need and not p.exp.imatrix:
        raise OrchestrateError(f"{', '.join(need)} need{'s' if len(need) == 1 else ''} an importance matrix "
                               f"for {p.model.name} (llama-quantize decides this per tensor): add --imatrix, or "
                               "leave out " + ", ".join(need))
    return set(need)


def importance_matrix(model: Path | None, text: Path | None, split: float, ctx: int, chunks: int, opts: Options,
                      say=logger.info) -> Imatrix:
    """`orchestrate imatrix`: the importance matrix of the model (the demo's by default) on the first
    `split` of the text, as a sweep with --imatrix makes it (from the cache when it was made)."""
    model, text = model_and_text(model, text)
    fit_part = texts.split(text, split)[0]
    fork = build.build(quiet=True, backend=opts.backend)
    base = prepare_base(model, fork)
    return imatrix.make(fork, base.path, base.sha256, fit_part.path, fit_part.sha256, ctx, chunks,
                        opts.threads or os.cpu_count() or 1, dict(opts.llama_env or {}), paths.cache_dir(), say=say)


def kld_size_estimate(base: Path, chunks: int, ctx: int) -> int | None:
    """Bytes llama-perplexity will write for the base logits (2 bytes per vocab entry per token)."""
    tokens = analysis.open_model(base).get_field("tokenizer.ggml.tokens")
    if tokens is None or not chunks:
        return None
    return analysis.array_length(tokens) * 2 * (ctx // 2) * chunks


def _disk_need(p: Prepared, todo: list[Variant], keep_models: bool, base_bytes: int, hist: plan.History) -> plan.Need:
    """The peak disk of the variants still to run (the base's --kld logits when the base is one of them)."""
    base_todo = p.inp.kld and any(v.kind == "base" for v in todo)
    logits = (kld_size_estimate(p.model, p.chunks, p.inp.ctx) or 0) if base_todo else 0
    return plan.disk_need(base_bytes, [v.qtype for v in todo if v.kind != "base"], keep_models, logits, p.upcast, hist)


def default_reference(names: list[str]) -> str | None:
    """Stock Q4_0 when the sweep has it: the same 4 bits of information as the hooked variants."""
    return "q4_0" if "q4_0" in names else None


def compare_all(rows: list[results.Row], reference: str | None) -> tuple[dict, dict]:
    """Paired statistics over every variant that was scored (study.paired.study), and the tails of
    their per-token KLD (study.tails)."""
    ok = [r for r in rows if r.status == "ok"]
    try:
        found = {r.name: scores.read(Path(r.scores_file)) for r in ok}
        base = next((r.name for r in ok if r.kind == "base"), None)
        reference = reference if reference in found else None
        return paired.study(found, base, reference), tails.tails(found, reference)
    except OrchestrateError as e:
        return {"error": str(e)}, {}


def with_tails(rows: list[results.Row], t: dict) -> list[results.Row]:
    """The rows with their KLD tail percentiles (results.csv's columns)."""
    found = t.get("variants") or {}
    return [r.but(**{f"kld_{k}": found[r.name][k]["value"] for k in (*tails.LEVELS, "max")}) if r.name in found
            else r for r in rows]


def with_code_bits(rows: list[results.Row]) -> list[results.Row]:
    """Table variants' rows with their bits per weight as 4-bit codes (study.stats.code_bits)."""
    out = []
    for r in rows:
        hist = Path(r.run_dir or "/nonexistent") / "hist.json"
        if r.status == "ok" and r.kind in ("table", "rules") and hist.exists():
            r = r.but(**stats.code_bits(read_json(hist), r.bpw, r.elements))
        out.append(r)
    return out


def task_answers(rows: list[results.Row], tasks, reference: str | None) -> dict:
    """Every task's answers, per variant that was scored (in the order asked), and the comparisons
    (study.answers.study)."""
    ok = [r for r in rows if r.status == "ok"]
    base = next((r.name for r in ok if r.kind == "base"), None)
    out = {}
    for t in tasks:
        records = {r.name: read_json(ScoreDir(Path(r.score_dir)).answers(t)) for r in ok}
        found = {n: rec["correct"] for n, rec in records.items()}
        out[t.label] = {"mode": t.mode, "file": str(t.path), "sha256": t.sha256, "questions": t.questions,
                        **answers.study(found, base, reference if reference in found else None),
                        "printed": {n: rec["printed"] for n, rec in records.items()}, "answers": found}
    return out


def sweep(exp: Experiment, model: Path | None, text: Path | None, out: Path | None, opts: Options = Options(),
          damage_variant: str | None = None, reference: str | None = None, execute=run_local,
          force: bool = False) -> tuple[Path, dict]:
    """The main job: build if needed, prepare the base, run every variant, write the report."""
    from .report import report
    gc.freeze()  # what is imported by now (matplotlib: ~80k objects) lives on: out of every collection
    names = [v.name for v in exp.variants()]
    if reference is not None and reference not in names:
        raise OrchestrateError(f"--reference {reference}: no such variant in {exp.name} "
                               f"(variants: {', '.join(names)})")
    reference = reference or default_reference(names)
    model, text = model_and_text(model, text)
    out = Path(out) if out else paths.plots_dir() / f"{exp.name}-{model.stem}"
    text, fit_part, score_part = _parts(text, exp, opts)
    with results.locked(out):
        fork = build.build(quiet=False, backend=opts.backend)
        p = prepare(exp, model, text, opts, fork, make_base=True)
        imatrix_types = _check_imatrix(p)
        inp = p.inp
        im = None
        if p.exp.imatrix:
            im = imatrix.make(fork, inp.base.path, inp.base.sha256, fit_part.path, fit_part.sha256, inp.ctx,
                              p.chunks, inp.threads, inp.llama_env, inp.cache, say=logger.info)
        if inp.kld:
            size = kld_size_estimate(inp.base.path, p.chunks, inp.ctx)
            logger.info("note: --kld stores the base's logits once (%s) under %s",
                     f"about {size / 1e9:.1f} GB" if size else "size unknown", inp.cache / "scores")
        if execute is run_local:  # (on a cluster, models and logits go to the workers' disks)
            todo = [v for v in fitting.with_imatrix(p.exp.variants(), {}, im, imatrix_types)[0]
                    if not finished_row(inp, v)]
            need = _disk_need(p, todo, opts.keep_models, inp.base.path.stat().st_size, plan.history(inp.cache))
            plan.refuse_if_too_big(need, inp.cache, force)
        variants, unfit = fitting.with_imatrix(*fitting.with_tables(p.exp, inp, out, im), im, imatrix_types)
        rows = execute(variants, inp, opts.keep_models, Display(variants), unfit,
                       functools.partial(cache.record, sweep=out))
        rows = [runs.export(row, out) for row in rows]
        compared, tail = compare_all(rows, reference)
        rows = with_code_bits(with_tails(rows, tail))
        settings = {"ctx": inp.ctx, "chunks": inp.chunks, "kld": inp.kld, "threads": inp.threads,
                    "llama_env": inp.llama_env}
        doc = results.document(p.exp.name, p.exp.description, inp.base, inp.text, inp.text_id, settings, fork, rows,
                               analysis.measurement())
        doc["paired"], doc["tails"] = compared, tail
        doc["tasks"] = task_answers(rows, inp.tasks, reference)
        doc["texts"] = text_record(inp, variants, fit_part, score_part, im)
        report.write_all(doc, out, damage_variant)
    return out, doc


def plan_sweep(exp: Experiment, model: Path | None, text: Path | None, opts: Options = Options()) -> list[str]:
    """`sweep --plan`: the variants, which are cached, the disk at the peak against the free space,
    and the time, without running the sweep (at most a one-chunk calibration of the base)."""
    model, text = model_and_text(model, text)
    text, fit_part, _ = _parts(text, exp, opts)
    p = prepare(exp, model, text, opts, build.current(opts.backend), make_base=False)
    inp = p.inp
    params = plan.model_params(p.model)
    variants = p.exp.variants()
    fitted_from = None if p.upcast else cached_histogram(inp.fork, inp.base.sha256)
    if fitted_from is not None:  # the tables the sweep will fit (a pure computation): their runs are known
        variants = [v.with_table(fit(v.fit, fitted_from)) if v.fit in FITTED else v for v in variants]
    im = None
    if p.exp.imatrix:  # the "-imat" twins too; none is cached while the matrix is still to make
        im = imatrix.cached(inp.fork, inp.base.sha256, fit_part.path, fit_part.sha256, inp.ctx, p.chunks, inp.cache)
        need = set() if p.upcast else _check_imatrix(p)
        variants = fitting.with_imatrix(variants, {}, im or Imatrix(Path(), "", fit_part.path, fit_part.sha256),
                                        need)[0]
    states = {v.name: "cached" if finished_row(inp, v) else "to run" for v in variants}
    hist = plan.history(inp.cache)
    calibrated, near = None, plan.near_rates(hist, params)
    if not near and not p.upcast:
        logger.info("note: no earlier runs on a model of this size to time by: one chunk of the base is run to "
                 "calibrate")
        calibrated = perplexity.seconds_per_token(inp.fork, inp.base.path, inp.scoring, inp.llama_env) / (params / 1e9)
    base_bytes = p.upcast or inp.base.path.stat().st_size
    tokens = p.chunks * inp.ctx
    answering = (plan.answering([t.key for t in inp.tasks], params, hist),) if inp.tasks else ()
    rows = [(v.name, states[v.name], *plan.estimate(v.qtype, base_bytes / 2 ** 20, tokens, params, hist, calibrated),
             *answering) for v in variants]
    if p.exp.imatrix:  # llama-imatrix: a pass of the base over the fitting part, timed as perplexity
        rows.insert(0, ("(importance matrix)", "cached" if im else "to make",
                        0.0, plan.estimate(None, 0, tokens, params, hist, calibrated)[1]))
    if p.upcast:
        rows.insert(0, ("(F16 upcast)", "to make", plan.estimate("F16", base_bytes / 2 ** 20, 0, params, hist, None)[0], 0.0))
    todo = [v for v in variants if states[v.name] != "cached"]
    need = _disk_need(p, todo, opts.keep_models, base_bytes, hist)
    header = (f"plan: {p.exp.name} on {p.model.name}: {len(variants)} variants, {len(todo)} to run; {inp.text.name}, "
              f"-c {inp.ctx}, {inp.chunks or f'all ({p.chunks})'} chunks, {inp.threads} threads")
    source = (f"perplexity timed from {sum(map(len, near.values()))} earlier runs here on models of about this size"
              if near else "perplexity timed by a one-chunk calibration of the base" if calibrated else
              "perplexity timed from earlier runs on models of another size (rough)" if hist.perplexity else
              "no perplexity timing yet")
    source += f", quantize from {sum(map(len, hist.quantize.values()))} earlier runs"
    return plan.render(header, rows, need, opts.keep_models, inp.cache, source)


def redraw(out: Path, damage_variant: str | None = None) -> list[tuple[str, str]]:
    """`orchestrate plot DIR`: the report's figures and text again, from results.json alone."""
    from .report import report
    return report.redraw(out, damage_variant)


def _looks(p: Prepared) -> tuple[int, ...]:
    """A scan's looks, each a whole number of llama-perplexity's batches of chunks (a window then scores
    what a full run scores: patch 0007)."""
    return tuple(sequential.schedule(p.chunks, align=max(1, BATCH // p.inp.ctx)))


def _scan_runner(inp: Inputs, variants: list[Variant], rows: list[results.Row], rule: scan_mod.Rule, step,
                 on_cluster: bool, address: str | None):
    """The tensors E changes in R, and a function that scores groups of them to their verdicts: one
    after another here, or as Ray tasks."""
    base, ref, enc = rows
    if on_cluster:
        from .study import cluster
        changed = cluster.changed_tensors(inp, variants, address)

        def run(gs):
            return cluster.run_groups(inp, variants, rows, gs, rule, address)
    else:
        sides = []
        for v, r in zip(variants[1:], rows[1:]):
            run_ = kept_model(inp, v, step)
            sides.append(scan_mod.Side(r.name, run_.model, v.qtype, r.tensor_key, Path(r.scores_file)))
        changed = groups.changed_tensors(sides[0].model, sides[1].model)

        def run(gs):
            return scan_mod.run_scan(inp, *sides, gs, rule, ScoreDir(Path(base.score_dir)).logits)
    if not changed:
        raise OrchestrateError(f"{enc.name} changes no tensor of {ref.name}: there is nothing to scan")
    return changed, run


def _screened(changed: list[str], gs: list[groups.Group], run) -> tuple[list[scan_mod.GroupResult], dict]:
    """--screen: the layers and kinds scanned whole first; the groups inside one decided below the
    threshold are not scored (scan.screened)."""
    parents, seen = [], set()
    for g in groups.make_groups(changed, "layer") + groups.make_groups(changed, "kind"):
        if g.tensors not in seen:
            seen.add(g.tensors)
            parents.append(g)
    logger.info("scan --screen: first the %d layers and kinds whole", len(parents))
    found = run(parents)
    return found, scan_mod.screened(gs, found)


def scan(exp: Experiment, by: str, model: Path | None, text: Path | None, out: Path | None, opts: Options = Options(),
         threshold: float | None = None, width: float | None = None, address: str | None = None,
         on_cluster: bool = False, screen: bool = False) -> tuple[Path, dict]:
    """`orchestrate scan`: exp holds the reference (a stock type) and the encoding (a radius or a table
    on that type); each group of the tensors the encoding changes is scored alone, adaptively: here,
    or with on_cluster as Ray tasks (the cluster at address)."""
    from .report import scan_report
    model, text = model_and_text(model, text)
    out = Path(out) if out else paths.plots_dir() / f"{exp.name}-{by}-{model.stem}"
    scanned = held_out = None
    if opts.split is not None:  # the scan fits (a recipe) on the first part; the rest is held out
        scanned, held_out = texts.split(text, opts.split)
        text = scanned.path
    with results.locked(out):
        fork = build.build(quiet=False, backend=opts.backend)
        p = prepare(exp, model, text, replace(opts, kld=True), fork, make_base=True)
        _check_imatrix(p)
        inp = p.inp
        variants, unfit = fitting.with_tables(p.exp, inp, out)
        if unfit:
            raise OrchestrateError(next(iter(unfit.values())))
        display = Display(variants)
        record = functools.partial(cache.record, sweep=out)
        if on_cluster:
            from .study import cluster
            rows = cluster.run(variants, inp, True, display, {}, record, address=address)
        else:
            rows = run_local(variants, inp, True, display, {}, record)
        for r in rows:
            if r.status != "ok":
                raise OrchestrateError(f"{r.name} failed: {r.reason}" + (f" (log: {r.log})" if r.log else ""))
        base, ref, enc = rows
        rule = scan_mod.Rule(_looks(p), threshold, width)
        changed, run = _scan_runner(inp, variants, rows, rule, display.step, on_cluster, address)
        gs = groups.make_groups(changed, by)
        parents, skip = _screened(changed, gs, run) if screen else ([], {})
        todo = [g for g in gs if g.name not in skip]
        logger.info("scan: %d group%s by %s%s, looks after %s chunks", len(todo), "s" * (len(todo) != 1), by,
                    f" ({len(skip)} screened out)" if screen else "", ", ".join(map(str, rule.looks)))
        found = run(todo)
        logits = None if on_cluster else ScoreDir(Path(base.score_dir)).logits  # (a cluster's stay on its nodes)
        settings = {"by": by, "looks": list(rule.looks), "threshold": threshold, "width": width,
                    "confidence": paired.CONFIDENCE, "ctx": inp.ctx, "chunks": p.chunks, "threads": inp.threads}
        doc = scans.document(settings, {"name": enc.name, "type": enc.type, "radius": enc.radius, "table": enc.table},
                             {"name": ref.name, "type": ref.type, "scores": ref.scores_file}, inp.base, logits,
                             inp.text, inp.text_id, fork, [r.to_dict() for r in rows],
                             [g.to_dict() for g in found])
        doc["screen"] = ({"parents": [g.to_dict() for g in parents],
                          "screened": [{"name": g.name, "layer": g.layer, "kind": g.kind, "tensors": list(g.tensors),
                                        "by": skip[g.name].group.name, "below": skip[g.name].effects["kld"].hi}
                                       for g in gs if g.name in skip]} if screen else None)
        doc["model"] = str(model)
        doc["scanned"] = texts.record(inp.text, inp.text_id, scanned)
        doc["held_out"] = texts.record(held_out.path, held_out.sha256, held_out) if held_out else None
        scan_report.write_all(doc, out)
    return out, doc


def plan_scan(exp: Experiment, by: str, model: Path | None, text: Path | None, opts: Options = Options(),
              screen: bool = False) -> list[str]:
    """`scan --plan`: the sweep plan of the base, R and E (kept, scored with KLD), then the groups, the most
    chunks they can take, and the time if every group took them all (the most the scan can cost)."""
    model, text = model_and_text(model, text)
    if opts.split is not None:  # the scan scores the first part (a sweep, the rest)
        text = texts.split(text, opts.split)[0].path
    opts = replace(opts, kld=True, keep_models=True, split=None)
    lines = plan_sweep(exp, model, text, opts)
    p = prepare(exp, model, text, opts, build.current(opts.backend), make_base=False)
    inp = p.inp
    if p.upcast:
        return lines + ["scan: the groups are known once the base's F16 upcast exists (run the scan, or a sweep)"]
    ref = planned_types(inp.fork, inp.base.path, p.exp.types[0])
    if len(p.exp.types) == 2:  # a type scan: the tensors whose type E changes
        enc = planned_types(inp.fork, inp.base.path, p.exp.types[1])
        tensors, what = [n for n in ref if enc.get(n, ref[n]) != ref[n]], f"tensors {p.exp.types[1]} changes"
    else:  # a radius or table: the tensors of the type it is applied to
        tensors, what = [n for n, t in ref.items() if t == p.exp.types[0].lower()], f"{p.exp.types[0]} tensors"
    gs = groups.make_groups(tensors, by)
    looks = _looks(p)
    params = plan.model_params(inp.base.path)
    _, per_group = plan.estimate(p.exp.types[-1], inp.base.path.stat().st_size / 2 ** 20, looks[-1] * inp.ctx, params,
                                 plan.history(inp.cache), None)
    most = f"~{plan.duration(per_group * len(gs))}" if per_group else "?"
    lines.append(f"scan: {len(gs)} groups by {by} of the {len(tensors)} {what}; looks after "
                 f"{', '.join(map(str, looks))} chunks; at most {len(gs) * looks[-1]} chunks in all, perplexity "
                 f"{most} if no group stops early; one group model at a time on disk beside R's and E's")
    if screen:
        wholes = {g.tensors for g in groups.make_groups(tensors, "layer") + groups.make_groups(tensors, "kind")}
        lines.append(f"scan --screen: first the {len(wholes)} layers and kinds whole (at most {len(wholes) * looks[-1]} "
                     "chunks more); the groups inside one decided below the threshold are then not scored")
    return lines


def recipe(scan_dirs: list[Path], budgets: list[recipe_mod.Budget], out: Path | None, text: Path | None,
           opts: Options = Options(), model: Path | None = None) -> tuple[Path, dict]:
    """`orchestrate recipe`: a recipe per budget from one or more scans (against one reference), each
    built and measured on text the scans did not see (their held-out part, or `text`) against the
    reference and each global encoding."""
    scan_dirs = [Path(d) for d in scan_dirs]
    found = [scans.load(d) for d in scan_dirs]
    recipe_mod.check_together(found)
    first = found[0]
    held = text or (Path(first["held_out"]["file"]) if first.get("held_out") else None)
    if held is None:
        raise OrchestrateError(f"{scan_dirs[0]} was scanned on the whole text: give --text (a text the scan did "
                               "not see), or scan with --split-text to hold part of it out")
    held = check_input_file(held, "held-out text")
    held_record = texts.record(held, sha256_of(held))
    if texts.overlaps(held_record, first.get("scanned") or {"sha256": first["text_sha256"]}):
        raise OrchestrateError(f"{held} is the text the scan was made on: a recipe is measured on other text")
    model = model or Path(first.get("model") or first["base"]["path"])
    options = recipe_mod.options(found, "kld" if budgets[0].tail else budgets[0].quantity)
    if not options:
        raise OrchestrateError(f"{', '.join(map(str, scan_dirs))}: no scanned group to choose among")
    out = Path(out) if out else paths.plots_dir() / f"recipe-{'-'.join(d.name for d in scan_dirs)}"
    with results.locked(out):
        return out, _recipe(found, scan_dirs, budgets, out, held, held_record, opts, model, options)


def _predictor(found: list[dict], options: list[recipe_mod.Option], level: str | None):
    """What predicts a recipe's figure: its groups' summed effect (recipe.predicted) or, for a tail
    budget, its own percentile token by token (recipe.tail_prediction)."""
    if level:
        ref_tokens, tokens = recipe_mod.kld_tokens(found, options)
        return lambda chosen: recipe_mod.tail_prediction(chosen, ref_tokens, tokens, level)
    n_looks = len(found[0]["settings"]["looks"])  # (the scans' settings are the same: check_together)
    return lambda chosen: recipe_mod.predicted(chosen, n_looks)


def _made(found: list[dict], scan_dirs: list[Path], budgets: list[recipe_mod.Budget], out: Path,
          options: list[recipe_mod.Option]) -> list[dict]:
    """A recipe per budget, its file written (none when no group fits: the reference itself)."""
    ref, encs, level = found[0]["reference"], [sc["encoding"] for sc in found], budgets[0].tail
    predict = _predictor(found, options, level)
    made = []
    for b in budgets:
        chosen = recipe_mod.choose_for_tail(options, b.limit, predict) if level else recipe_mod.choose(options, b.limit)
        name = f"recipe-{b.quantity}{'-' if level else ''}{b.limit:g}"
        rules, types = recipe_mod.rules(found, chosen), recipe_mod.tensor_types(found, chosen)
        note = (f"{len(chosen)} of {len({o.group for o in options})} groups of {' or '.join(e['name'] for e in encs)} "
                f"on {ref['type']} for {b.label}, from the scan{'s' * (len(found) > 1)} "
                f"{', '.join(str(d.resolve()) for d in scan_dirs)}")
        path = recipes.write_recipe(out / f"{name}.yaml", name, ref["type"], rules, note, types) if chosen else None
        if rules:  # the same recipe for the fork's own llama-quantize (PABLO_CONF=...)
            write_conf(out / f"{name}.pablo.conf", Hooks(True, rules=tuple(rule_arg(r) for r in rules)))
        if types:  # ... and its --tensor-type-file
            groups.type_file(tuple(types), types, out / f"{name}.tensor-types.txt")
        made.append({"name": name, "budget": {"quantity": b.quantity, "limit": b.limit}, "file": str(path) if path else None,
                     "groups": [o.group for o in chosen], "choices": {o.group: encs[o.scan]["name"] for o in chosen},
                     "gain": sum(o.gain for o in chosen), "predicted": predict(chosen),
                     "rules": len(rules) + len(types)})
    return made


def _verifying(found: list[dict], scan_dirs: list[Path], made: list[dict]) -> Experiment:
    """One sweep for every recipe, the reference and each scan's global encoding."""
    first, ref, encs = found[0], found[0]["reference"], [sc["encoding"] for sc in found]
    built = [recipes.read_recipe(Path(r["file"])) for r in made if r["file"]]
    return Experiment(f"verify-{'-'.join(d.name for d in scan_dirs)}",
                      types=[ref["type"]] + ([e["type"] for e in encs] if recipe_mod.by_type(first) else []),
                      ctx=first["settings"]["ctx"], chunks=first["settings"]["chunks"],
                      radius=[e["radius"] for e in encs if e.get("radius") is not None],
                      tables=[sc["variants"][2]["table_file"] for sc in found if sc["encoding"].get("table")],
                      rules=[RuleSet(name, qtype, tensors=tuple(rules), tensor_types=tuple(types.items()))
                             for name, qtype, rules, types in built])


def _recipe(found: list[dict], scan_dirs: list[Path], budgets: list[recipe_mod.Budget], out: Path, held: Path,
            held_record: dict, opts: Options, model: Path, options: list[recipe_mod.Option]) -> dict:
    from .report import recipe_report
    ref, encs = found[0]["reference"], [sc["encoding"] for sc in found]
    axis = "bpw" if recipe_mod.by_type(found[0]) else "zero_fraction"  # what a recipe gains: bits or zeros
    q, level = budgets[0].quantity, budgets[0].tail
    made = _made(found, scan_dirs, budgets, out, options)
    _, sweep_doc = sweep(_verifying(found, scan_dirs, made), model, held, out / "verify", replace(opts, kld=True),
                         reference=ref["name"])
    rows = {r["name"]: r for r in sweep_doc["variants"]}
    vs, own_tail = sweep_doc["paired"].get("vs_reference", {}), sweep_doc["tails"].get("variants", {})

    def measured_of(name: str) -> dict | None:
        """A variant's measured figure for the budget: its effect over R's, or (a tail) its own percentile."""
        if level:
            t = own_tail.get(name, {}).get(level)
            return {"mean": t["value"], "lo": t["lo"], "hi": t["hi"]} if t else None
        return vs.get(name, {}).get(q) if name != ref["name"] else {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    chunks = {} if level else {n: scan_mod.chunk_means(scores.read(results.scores_path(out / "verify", n)), q)
                               for n, row in rows.items() if row["status"] == "ok" and row["kind"] != "base"}
    global_names = [n for n in [ref["name"]] + [e["name"] for e in encs] if n in rows]
    for r in made:
        r["measured"] = measured = measured_of(r["name"] if r["file"] else ref["name"])
        r["x"] = rows[r["name"] if r["file"] else ref["name"]][axis]
        r["verdict"] = recipe_mod.verdict(r["predicted"], measured, r["budget"]["limit"]) if measured else None
        r["vs_globals"] = (recipe_mod.against_globals(r["x"], chunks[r["name"]],
                                                      [(n, rows[n][axis], chunks[n]) for n in global_names if n in chunks])
                           if r["name"] in chunks else None)
    doc = {"scans": [{"dir": str(d.resolve()), "sha256": sha256_of(d / scans.FILE), "encoding": e}
                     for d, e in zip(scan_dirs, encs)],
           "reference": ref, "quantity": q, "quantity_label": recipe_mod.QUANTITIES[q], "axis": axis,
           "texts": {"scan": {"file": found[0]["text"], "sha256": found[0]["text_sha256"]},
                     "verify": held_record},
           "recipes": made,
           "globals": {n: {"x": rows[n][axis], "measured": measured_of(n)} for n in global_names},
           "verify": str(out / "verify")}
    recipes.write(out, doc)
    recipe_report.write_all(doc, out)
    return doc
