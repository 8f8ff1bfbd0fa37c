"""llama-quantize: running the fork's with a hook configuration, and what it accepts.

The quantization types are whatever the built llama-quantize lists in its help (so a new
upstream's types are known without a code change), matched case-insensitively as
llama-quantize itself does. Whether a type needs an importance matrix is asked of
llama-quantize too (`--dry-run`, which writes nothing), per base model.
"""

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from .. import paths
from ..errors import OrchestrateError
from ..files import check_input_file, check_writable, memoized, read_text, refuse_overwrite
from ..fork.build import Fork
from ..parse import dry_run_types, parse_quantize, quantize_progress
from ..proc import Progress, clean_env, failure_reason, run_logged
from ..hooks.conf import STOCK, Hooks, write_conf

IMATRIX_NOTE = "will require an imatrix"


def quant_types(fork: Fork) -> list[str]:
    """The type names the fork's llama-quantize accepts, in its own order (e.g. Q4_0, Q4_K_M)."""
    return memoized(paths.cache_dir() / "quant-types" / f"{fork.id}.json", lambda: _listed_types(fork))


def _listed_types(fork: Fork) -> list[str]:
    res = subprocess.run([str(fork.binary("llama-quantize")), "--help"], capture_output=True,
                         encoding="utf-8", errors="replace", env=clean_env())
    text = res.stdout + res.stderr
    names = re.findall(r"^\s+(?:\d+\s+or\s+)?([A-Z][A-Z0-9_]*)\s*:", text.split("allowed quantization types", 1)[-1],
                       re.M)
    if not names:
        raise OrchestrateError(f"{fork.binary('llama-quantize')} --help lists no quantization types")
    return names


def canonical_type(fork: Fork, name: str) -> str:
    """NAME as llama-quantize spells it, or a one-line error listing what it accepts."""
    known = quant_types(fork)
    for t in known:
        if t.lower() == name.strip().lower():
            return t
    raise OrchestrateError(f"unknown quantization type '{name}' (llama-quantize accepts: {', '.join(known)})")


def needs_imatrix(fork: Fork, base: Path, base_id: str, qtype: str) -> bool:
    """True when quantizing `base` to `qtype` needs an importance matrix (asked of llama-quantize)."""
    return memoized(paths.cache_dir() / "imatrix-check" / f"{base_id[:16]}-{fork.id}-{qtype}.json",
                    lambda: {"needs_imatrix": _dry_run_needs_imatrix(fork, base, qtype)}, lambda d: d["needs_imatrix"])


def _dry_run(fork: Fork, base: Path, qtype: str) -> str:
    res = subprocess.run([str(fork.binary("llama-quantize")), "--dry-run", str(base), qtype, "1"],
                         capture_output=True, encoding="utf-8", errors="replace", env=clean_env())
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise OrchestrateError(f"llama-quantize --dry-run {qtype} failed ({failure_reason(text)})")
    return text


def _dry_run_needs_imatrix(fork: Fork, base: Path, qtype: str) -> bool:
    return IMATRIX_NOTE in _dry_run(fork, base, qtype)


def planned_types(fork: Fork, base: Path, qtype: str) -> dict[str, str]:
    """The type llama-quantize would give each tensor of base quantized to qtype (copied ones absent)."""
    return dry_run_types(_dry_run(fork, base, qtype))


def _clear_stale(out: Path) -> None:
    """Remove the work directories that killed runs for this output left (a live run holds a lock on
    its own, so it is never touched)."""
    for d in out.parent.glob(f".quantize-{glob.escape(out.name)}-*"):
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # held: another run is writing this output now
            raise OrchestrateError(f"another quantization is writing {out} now ({d}); wait for it or choose "
                                   "another output") from None
        finally:
            os.close(fd)


STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def work_dir(out: Path):
    """A temporary directory beside out, locked while this run uses it and removed after, whatever
    happens; one left by a killed run (kill -9) is removed by the next run for the same output."""
    _clear_stale(out)
    # made and locked with the stopping signals held back: a Ctrl-C between making the directory and
    # the try below would leave it behind (the signal is handled as soon as they are let through)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".quantize-{out.name}-", dir=out.parent))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            yield tmp
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)  # the clean-up is not cut short either
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_quantize(fork: Fork, base: Path, out: Path, qtype: str, hooks: Hooks = STOCK, hist: Path | None = None,
                 threads: int | None = None,
                 extra: list[str] = (), progress: bool = True, log_path: Path | None = None,
                 env: dict[str, str] | None = None, on_tensor: Callable[[int, int], None] | None = None) -> dict:
    """Quantize base -> out with the given hook settings. Nothing is left at `out` (or `hist`)
    unless the whole run succeeded. Returns the parsed sizes, the command and the wall time.
    progress: a status line of its own; on_tensor(done, total): for the caller's."""
    out, base = Path(out), check_input_file(base, "model")
    log_path = Path(log_path or out.with_name(out.name + ".log"))
    refuse_overwrite({"output": out, "histogram file": hist, "log": log_path}, {"model": base})
    check_writable(out, "output")
    if hist:
        check_writable(hist, "histogram file")
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = threads or os.cpu_count() or 1
    with work_dir(out) as tmp:
        tmp_out, tmp_hist = tmp / out.name, tmp / "hist.json"
        run_env = clean_env(env)
        if hooks != STOCK or hist:
            run_env["PABLO_CONF"] = str(write_conf(tmp / "pablo.conf", hooks, tmp_hist if hist else None))
        cmd = [fork.binary("llama-quantize"), *extra, base, tmp_out, qtype, str(threads)]
        bar = Progress() if progress else None

        def on_line(line):
            p = quantize_progress(line)
            if bar and p:
                bar.show(f"quantize {out.name}: tensor {p[0]}/{p[1]}")
            if on_tensor and p:
                on_tensor(*p)
        with open(log_path, "w", encoding="utf-8") as log:
            rc, seconds = run_logged(cmd, log, on_line, env=run_env, cwd=tmp)  # cwd: no stray ./pablo.conf
        if bar:
            bar.done()
        text = read_text(log_path)
        if rc != 0 or not tmp_out.exists():
            raise OrchestrateError(f"llama-quantize failed ({failure_reason(text)}); log: {log_path}")
        result = parse_quantize(text)
        if hist:
            if not tmp_hist.exists():
                raise OrchestrateError(f"llama-quantize wrote no histograms; log: {log_path}")
            Path(hist).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tmp_hist, hist)
        os.replace(tmp_out, out)
    # the command as run, but naming the output where it now is (the temporary directory is gone)
    result.update(command=[str(out if c == tmp_out else c) for c in cmd], seconds=seconds, log=str(log_path))
    return result
