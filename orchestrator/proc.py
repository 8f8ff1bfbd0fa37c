"""Running llama.cpp's tools: a clean environment, merged output logged as UTF-8 as it comes,
a one-line progress display, and the line that says why a tool failed."""

import codecs
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .files import printable

# Variables that silently change what llama.cpp computes or reads: every command-line option
# (LLAMA_ARG_*), debug and disable switches (LLAMA_*, GGML_*), our hook configuration. What a
# user wants to pass goes through `--llama-env` and into the run's cache key instead.
LLAMA_ENV_PREFIXES = ("LLAMA_", "LLAMACPP_", "GGML_", "PABLO_")

# A tool outlives a sweep (or a cluster worker) killed with -9 unless told otherwise: it would go on
# writing into a run directory that the resumed sweep is cleaning. util-linux's setpriv sets the
# parent-death signal and execs the tool (a preexec_fn would be unsafe in Ray's threaded workers).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def run_logged(cmd: list[str], log, on_line: Callable[[str], None] | None = None,
               env: dict | None = None, cwd: Path | None = None,
               on_output: Callable[[str], None] | None = None) -> tuple[int, float]:
    """Run cmd, writing its merged output to the open file `log`; return (exit code, seconds).
    on_line gets each whole line; on_output each piece of output as it comes, cut anywhere (a tool
    that reports progress without ending its line, like llama-perplexity's chunks, is seen at once)."""
    log.write(printable(f"$ {' '.join(map(str, cmd))}\n"))
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(DIE_WITH_PARENT + [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd)
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    line = ""
    try:
        while True:
            data = os.read(proc.stdout.fileno(), 1 << 16)
            text = decode(data, final=not data)
            if text:
                log.write(text)
                log.flush()  # a log that is watched (or left by a killed run) is up to date
                if on_output:
                    on_output(text)
                if on_line:  # (a line is kept back only for it)
                    *whole, line = (line + text).split("\n")
                    for w in whole:
                        on_line(w + "\n")
            if not data:
                break
        if line and on_line:
            on_line(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    log.flush()
    return rc, time.monotonic() - t0


def clean_env(extra: dict[str, str] | None = None) -> dict:
    """The environment for a llama.cpp tool: the caller's, less everything that would change its
    results unseen, plus `extra` (the user's documented --llama-env settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LLAMA_ENV_PREFIXES)}
    env.update(extra or {})
    return env


class Progress:
    """One status line: rewritten in place on a terminal, printed at most every few seconds otherwise."""

    def __init__(self, stream=sys.stderr, every: float = 10.0):
        self.stream, self.every, self.last = stream, every, 0.0
        self.tty = stream.isatty()

    def show(self, text: str, force: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif force or time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(text, file=self.stream, flush=True)

    def done(self, text: str = "") -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        if text:
            print(text, file=self.stream, flush=True)


def failure_reason(text: str) -> str:
    """The line of a tool's output that says why it failed (the last error line, else the last line)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "failed" in line.lower():
            return line.split("failed to quantize: ", 1)[-1][-300:]
    return lines[-1][-300:] if lines else "no output"
