"""Run a sweep's variants, or a scan's groups, as Ray tasks on a cluster (`--executor ray`).

Each variant is one task that asks for what it needs (--threads CPUs; a GPU when the fork
has a GPU backend), so Ray runs as many at once as the cluster holds. A task works in its
node's own cache (`<cache>/worker`): the same run key and the same steps as a local sweep.
It reads the base model, the text and the tables where the driver found them (shared
storage) after checking their sha256 and that its fork build is the driver's. What it
returns — the run's small artifacts: results, histograms, analysis, per-token scores, logs —
the driver writes into its own cache, result.json last, so the driver's cache stays the one
source of truth and a re-run (local or not) finds the variant done. Models and logits stay
on the worker. A task whose worker dies is retried by Ray; the driver holds each in-flight
variant's run lock, which the OS releases if the driver dies.

A scan's groups go the same way (run_groups): each group is a task that makes R's and E's models and
the base's logits once per node, takes the rounds the driver already has (a chunk scored once is
never scored again) and brings its rounds and verdict back into the driver's scan directory.
"""

import contextlib
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from .. import paths
from ..errors import OrchestrateError
from ..files import read_text, write_atomic, write_json
from ..results import Row
from . import groups, runner, scan as scan_mod
from .groups import Group
from .runs import Inputs, RunDir, ScoreDir, run_dir, score_dir
from .base import scanned
from .experiment import Variant

logger = logging.getLogger(__name__)
INSTALL = "pip install -e '.[ray]'"
RETRIES = 2  # re-runs of a variant whose worker process or node died


def import_ray():
    try:
        import ray
    except ImportError:
        raise OrchestrateError(f"--executor ray needs Ray, an optional extra: {INSTALL}") from None
    return ray


def _reachable(address: str) -> None:
    """Fail in one line at once, not after Ray's minutes of retries, when nothing listens there."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise OrchestrateError(f"--ray-address {address}: expected HOST:PORT (the head node's GCS port, e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise OrchestrateError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


def connect(address: str | None):
    """Ray, connected to the cluster at address (else $RAY_ADDRESS, else a local instance started now)."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _reachable(address)
    if not ray.is_initialized():
        log = paths.cache_dir() / "ray-driver.log"
        try:
            with _stderr_to(log):  # Ray's C++ core writes its start-up warnings straight to fd 2
                ray.init(address=address, logging_level="ERROR", log_to_driver=False,
                         **({} if address else {"include_dashboard": False}))
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ... with multi-line messages
            raise OrchestrateError(f"cannot connect to Ray at {address or 'a local instance'}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (log: {log})") from None
    return ray


@contextlib.contextmanager
def _stderr_to(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---- on the worker ------------------------------------------------------------------------

def _node() -> str:
    import ray
    return ray.util.get_node_ip_address()


def worker_inputs(inp: Inputs, variants: list[Variant]) -> Inputs:
    """The driver's inputs as seen from this node: its own fork build (which must be the driver's),
    the same base, text and tables (checked), and its own cache."""
    from ..fetch import sha256_of
    from ..fork import build
    from .base import file_id
    node = _node()
    try:
        fork = build.current(inp.fork.backend)
    except OrchestrateError as e:
        raise OrchestrateError(f"node {node} has no usable fork build ({e})") from None
    if fork.id != inp.fork.id:
        raise OrchestrateError(f"node {node}: its fork build {fork.id} differs from the driver's {inp.fork.id} "
                               "(build the same checkout there: `orchestrate build`)")
    files = [("base model", inp.base.path, inp.base.sha256, file_id), ("text", inp.text, inp.text_id, sha256_of)]
    files += [("table", v.table.path, None, None) for v in variants if v.table]
    files += [(f"task file ({t.mode})", t.path, t.sha256, sha256_of) for t in inp.tasks]
    files += [("importance matrix", v.imatrix.path, v.imatrix.sha256, sha256_of) for v in variants if v.imatrix]
    for what, path, sha, digest in files:
        if not os.access(path, os.R_OK) or not Path(path).is_file():
            raise OrchestrateError(f"node {node} cannot read the {what} {path} "
                                   "(workers need it at the same path: put it on shared storage)")
        if sha and digest(Path(path)) != sha:
            raise OrchestrateError(f"node {node}: the {what} {path} differs from the driver's (sha256)")
    return replace(inp, fork=fork, cache=paths.cache_dir() / "worker")


def check_node(inp: Inputs, variants: list[Variant]) -> str | None:
    """A task's worth of checks without the work: None, or why this node cannot run the sweep."""
    try:
        worker_inputs(inp, variants)
    except OrchestrateError as e:
        return str(e)
    return None


def _files(d: Path, names) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in names if (d / n).exists()}


def _on_worker(work) -> dict:
    """work() on this node: {ok, value} or {ok: False, reason (one line), log_text (the failed tool's
    log, or a bug's trace)}; never raises for the work's own failure."""
    node = _node()
    try:
        return {"ok": True, "value": work(), "node": node}
    except OrchestrateError as e:
        log = getattr(e, "log", None)
        return {"ok": False, "reason": f"on node {node}: {e}", "node": node,
                "log_text": read_text(log) if log and Path(log).is_file() else None}
    except Exception as e:  # a bug costs this piece of work, with its trace, not the whole run
        return {"ok": False, "reason": f"on node {node}: internal error: {type(e).__name__}: {e}", "node": node,
                "log_text": "".join(traceback.format_exception(e))}


def run_task(inp: Inputs, v: Variant, keep_models: bool, kld_tensors: str | None, board) -> dict:
    """One variant on a worker; returns its row, timings and small artifacts (as _on_worker says)."""
    start = time.time()
    # waited for: a message still queued in this worker is lost if it is killed, and the driver would
    # count one attempt fewer than were made
    import_ray().get(board.started.remote(v.name, _node(), start))
    marks, posted = {}, 0.0

    def step(var, what, detail=False):
        nonlocal posted
        if detail and time.time() - posted < 60:  # how far a step is: to the driver once a minute
            return
        if not detail:
            marks.setdefault(what, time.time())
        posted = time.time()
        board.step.remote(var.name, what)

    def work():
        winp = worker_inputs(inp, [v])
        kld_base = None
        if inp.kld and v.kind != "base":  # this node's own copy of the base's logits, made once
            base_v = Variant("base", "base")
            sdir = score_dir(winp, kld_tensors, None)
            runner.scored(winp, base_v, winp.base.path, sdir, None, step)
            kld_base = runner.KldBase(kld_tensors, sdir.logits)
        row = runner.run_variant(winp, v, keep_models, kld_base, step)
        return {"row": row, "run_files": _files(Path(row.run_dir), RunDir.SMALL),
                "score_files": _files(Path(row.score_dir), ScoreDir(Path(row.score_dir)).small(winp.tasks))}
    out = _on_worker(work)
    out.update(out.pop("value", None) or {})
    tools = [marks[k] for k in ("quantize", "perplexity") if k in marks]
    out.update(start=start, end=time.time(), first_tool=min(tools) if tools else None)
    return out


class Board:
    """A Ray actor where tasks post what they are doing, for the driver's progress display."""

    def __init__(self):
        self.running, self.attempts = {}, {}

    def started(self, name, node, t):
        self.attempts[name] = self.attempts.get(name, 0) + 1
        self.running[name] = {"node": node, "step": "starting", "since": t}

    def step(self, name, what):
        if name in self.running:
            self.running[name]["step"] = what

    def done(self, name):
        self.running.pop(name, None)

    def snapshot(self):
        return self.running, self.attempts


# ---- on the driver ------------------------------------------------------------------------

def land(inp: Inputs, v: Variant, res: dict, kld_tensors: str | None, attempts: int, submitted: float) -> Row:
    """Write what a task brought back into the driver's run and score directories, result.json last."""
    run = run_dir(inp, v)
    if not res["ok"]:
        return runner.failed_row(v, res["reason"], _log(res, run.error_log))
    row = res["row"]
    sdir = score_dir(inp, row.tensor_key, kld_tensors if inp.kld and v.kind != "base" else None)
    for d, files in ((run.path, res["run_files"]), (sdir.path, res["score_files"])):
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(d / name, data)
    row = row.but(run_dir=str(run.path), score_dir=str(sdir.path), scores_file=str(sdir.scores),
                  ran_on={"node": res["node"], "submitted": submitted, "start": res["start"], "end": res["end"],
                          "first_tool": res["first_tool"], "attempts": attempts})
    write_json(run.result, row.to_dict())
    return row


def _status(running: dict, now: float) -> str:
    return ", ".join(f"{n}@{r['node']} {r['step']} {int(now - r['since'])}s" for n, r in sorted(running.items()))


def run(variants: list[Variant], inp: Inputs, keep_models: bool, display, unfit: dict, record,
        address: str | None = None) -> list[Row]:
    """Every variant as a Ray task; rows in the experiment's order (record: as in runner.run_local)."""
    ray = connect(address)
    problem = ray.get(ray.remote(check_node).options(num_cpus=0).remote(inp, variants))
    if problem:
        raise OrchestrateError(problem)
    kld_tensors = scanned(inp.base)["tensor_key"] if inp.kld else None
    board = ray.remote(Board).options(num_cpus=0).remote()
    task = ray.remote(run_task).options(num_cpus=inp.threads, num_gpus=1 if inp.fork.gpu else 0,
                                        max_retries=RETRIES, retry_exceptions=False)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // inp.threads)
    rows, pending = {}, {}
    for v in variants:
        if v.name in unfit:
            rows[v.name] = runner.failed_row(v, unfit[v.name], None)
        elif (row := runner.finished_row(inp, v)) is not None:
            rows[v.name] = runner.finish_row(v, row)
        else:
            run = run_dir(inp, v)
            run.path.mkdir(parents=True, exist_ok=True)
            lock = runner.take_lock(run.lock, v, display.step)
            pending[task.remote(inp, v, keep_models, kld_tensors, board)] = (v, lock, time.time())
        if v.name in rows:
            record(rows[v.name])
            display.finished(v, rows[v.name], 0.0, False)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            running, attempts = ray.get(board.snapshot.remote())
            left = len(pending) - len(done)
            display.cluster(_status(running, time.time()), left, min(slots, max(left, 1)))
            for ref in done:
                v, lock, submitted = pending.pop(ref)
                try:
                    res = ray.get(ref)
                    row = land(inp, v, res, kld_tensors, attempts.get(v.name, 1), submitted)
                    seconds = res["end"] - res["start"]
                except Exception as e:  # the task itself was lost (retries spent, node gone)
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    row, seconds = runner.failed_row(v, f"lost on the cluster: {reason}", None), None
                finally:
                    lock.release()
                board.done.remote(v.name)
                rows[v.name] = runner.finish_row(v, row) if row.status == "ok" else row
                record(rows[v.name])
                display.finished(v, rows[v.name], seconds or 0.0, seconds is not None)
    finally:
        for _, lock, _ in pending.values():
            lock.release()
    return [rows[v.name] for v in variants]


# ---- a scan's groups ------------------------------------------------------------------------

def _changed(inp: Inputs, variants: list[Variant]) -> dict:
    """On a worker: the tensors E changes in R (from their models, made in its cache if need be)."""
    def work():
        winp = worker_inputs(inp, variants)
        return groups.changed_tensors(*[_kept(winp, v) for v in variants[1:]])
    return _on_worker(work)


def _kept(winp: Inputs, v: Variant) -> Path:
    run_dir(winp, v).path.mkdir(parents=True, exist_ok=True)
    return runner.kept_model(winp, v, lambda *a, **k: None).model


def scan_task(inp: Inputs, variants: list[Variant], keys: tuple[str, str, str], g: Group, rule, ref_means: dict,
              rounds: dict[str, bytes], board) -> dict:
    """One scan group on a worker, from the rounds the driver has to its verdict; brings back its rounds
    and result (as _on_worker says)."""
    import_ray().get(board.started.remote(g.name, _node(), time.time()))

    def work():
        winp = worker_inputs(inp, variants)
        sdir = score_dir(winp, keys[0], None)  # this node's own copy of the base's logits, made once
        runner.scored(winp, variants[0], winp.base.path, sdir, None, lambda *a, **k: None)
        ref, enc = (scan_mod.Side(v.name, _kept(winp, v), v.qtype, key, None) for v, key in zip(variants[1:], keys[1:]))
        d = scan_mod.group_dir(winp, ref, enc, g)
        d.path.mkdir(parents=True, exist_ok=True)
        for name, data in rounds.items():
            if not (d.path / name).exists():
                write_atomic(d.path / name, data)
        scan_mod.scan_group(winp, ref, enc, g, rule, ref_means, sdir.logits,
                            lambda group, what: board.step.remote(group.name, what))
        return {"rounds": d.rounds(), "result": d.result.read_bytes()}
    return _on_worker(work)


def _log(res: dict, log: Path) -> Path | None:
    """A failed task's log, written on the driver; None if it brought none back."""
    if not res.get("log_text"):
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(log, res["log_text"])
    return log


def _failed(res: dict, what: str, log: Path) -> OrchestrateError:
    log = _log(res, log)
    return OrchestrateError(f"{what}: {res['reason']}" + (f" (log: {log})" if log else ""))


def changed_tensors(inp: Inputs, variants: list[Variant], address: str | None) -> list[str]:
    """The tensors E changes in R, asked of a worker (it has, or makes, their models)."""
    ray = connect(address)
    task = ray.remote(_changed).options(num_cpus=inp.threads, num_gpus=0, max_retries=RETRIES, retry_exceptions=False)
    res = ray.get(task.remote(inp, variants))
    if not res["ok"]:
        raise _failed(res, "the tensors the encoding changes", paths.cache_dir() / "errors" / "scan-changed.log")
    return res["value"]


def run_groups(inp: Inputs, variants: list[Variant], rows: list[Row], gs: list[Group], rule,
               address: str | None) -> list[scan_mod.GroupResult]:
    """A scan's groups as Ray tasks, after its base, R and E ran (rows, in the driver's cache): every
    group not finished here, each to its verdict."""
    ray = connect(address)
    _, ref_row, enc_row = rows
    ref = scan_mod.Side(ref_row.name, Path(), variants[1].qtype, ref_row.tensor_key, Path(ref_row.scores_file))
    enc = scan_mod.Side(enc_row.name, Path(), variants[2].qtype, enc_row.tensor_key, None)
    ref_means = scan_mod.reference_means(ref, rule)
    keys = (scanned(inp.base)["tensor_key"], ref.tensors, enc.tensors)
    board = ray.remote(Board).options(num_cpus=0).remote()
    task = ray.remote(scan_task).options(num_cpus=inp.threads, num_gpus=1 if inp.fork.gpu else 0,
                                         max_retries=RETRIES, retry_exceptions=False)
    found, pending = {}, {}
    for g in gs:
        d = scan_mod.group_dir(inp, ref, enc, g)
        d.path.mkdir(parents=True, exist_ok=True)
        if (done := scan_mod.finished(d, g, rule)) is not None:
            found[g.name] = done
            continue
        lock = d.lock
        lock.acquire()
        pending[task.remote(inp, variants, keys, g, rule, ref_means, d.rounds(), board)] = (g, d, lock)
    t0 = time.monotonic()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=30.0)
            if not done:
                running, _ = ray.get(board.snapshot.remote())
                logger.info("scan: %d/%d groups done; %s", len(found), len(gs), _status(running, time.time()))
            for ref_ in done:
                g, d, lock = pending.pop(ref_)
                try:
                    res = ray.get(ref_)
                except Exception as e:  # the task itself was lost (retries spent, node gone)
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    raise OrchestrateError(f"scan group {g.name} lost on the cluster: {reason}") from None
                finally:
                    lock.release()
                board.done.remote(g.name)
                if not res["ok"]:
                    raise _failed(res, f"scan group {g.name}", d.path / "error.log")
                for name, data in res["value"]["rounds"].items():
                    write_atomic(d.path / name, data)
                write_atomic(d.result, res["value"]["result"])  # last: the group is finished here
                found[g.name] = scan_mod.finished(d, g, rule)
                logger.info("scan %d/%d %s: %s after %d chunks on %s (%.0f s so far)", len(found), len(gs), g.name,
                            found[g.name].verdict, found[g.name].chunks, res["node"], time.monotonic() - t0)
    finally:
        for ref_ in pending:
            ray.cancel(ref_, force=True)
        for _, _, lock in pending.values():
            lock.release()
    return [found[g.name] for g in gs]
