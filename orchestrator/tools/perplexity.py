"""llama-perplexity: the command for a model and scoring settings, a run that keeps its per-token
scores, and a one-chunk timing run."""

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import OrchestrateError, ToolError
from ..files import read_text
from ..fork.build import Fork
from ..parse import PerplexityProgress, parse_answers, parse_perplexity
from ..proc import clean_env, failure_reason, run_logged
from ..taskfiles import MODES, TaskFile

SCORES_ENV = "PABLO_SCORES"  # the fork writes every scored token's scores to this file (patch 0004)
# llama-perplexity's -c for tasks: one setting for every sweep, so that answers do not depend on the sweep's
# -c (it runs 4 sequences of this many tokens at once; a question must fit in their sum)
TASK_CTX = 512
TOO_SHORT = re.compile(r"you need at least (\d+) tokens.*?tokenizes to only (\d+) tokens", re.S)


@dataclass(frozen=True)
class Scoring:
    """How every model of a study is scored: the same text, context, chunks, threads and offload."""
    text: Path
    ctx: int
    chunks: int                    # 0: the whole text
    threads: int
    gpu_layers: int | None = None  # -ngl (None: not passed)


def command(fork: Fork, model: Path, s: Scoring, chunks: int | None = None) -> list:
    """llama-perplexity on model with these settings (chunks: other than the settings')."""
    chunks = s.chunks if chunks is None else chunks
    cmd = [fork.binary("llama-perplexity"), "-m", model, "-f", s.text, "-c", str(s.ctx), "-t", str(s.threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if s.gpu_layers is not None:
        cmd += ["-ngl", str(s.gpu_layers)]
    return cmd


def _reason(log: Path) -> str:
    return failure_reason(read_text(log)) if log.exists() else "no output"


def run(fork: Fork, model: Path, s: Scoring, log: Path, scores: Path, env: dict, kld_base: Path | None = None,
        save_logits: Path | None = None,
        on_chunks: Callable[[PerplexityProgress, float], None] | None = None) -> dict:
    """llama-perplexity on model (in log's directory), writing its output to log and every scored token's
    scores to scores; returns the parsed figures, the command and the time. kld_base: the base's logits to score
    against (--kld); save_logits: where to keep this model's logits (the base, with --kld), moved in place
    only when the run succeeded. on_chunks(progress, seconds so far) as chunks are done."""
    cmd = command(fork, model, s)
    tmp_logits = None
    if save_logits:
        tmp_logits = save_logits.with_name(f".{save_logits.name}.partial")
        cmd += ["--kl-divergence-base", tmp_logits]
    if kld_base:
        cmd += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    chunks, t0 = PerplexityProgress(), time.monotonic()

    def output(text):
        if chunks.feed(text) and on_chunks:
            on_chunks(chunks, time.monotonic() - t0)
    with open(log, "w", encoding="utf-8") as f:
        rc, seconds = run_logged(cmd, f, env={**clean_env(env), SCORES_ENV: str(scores)}, cwd=log.parent,
                                 on_output=output)
    text = read_text(log)
    short = TOO_SHORT.search(text)
    if short:  # it says so, then exits 0 with nothing scored
        raise ToolError(f"the text tokenizes to {short.group(2)} tokens; llama-perplexity needs at least "
                        f"{short.group(1)} at -c {s.ctx}", log)
    if rc != 0:
        raise ToolError(f"llama-perplexity exited with code {rc}: {_reason(log)}", log)
    try:
        res = parse_perplexity(text)
    except OrchestrateError as e:
        raise ToolError(str(e), log) from None
    if not scores.exists():
        raise ToolError(f"llama-perplexity wrote no per-token scores: {_reason(log)}", log)
    if tmp_logits:
        os.replace(tmp_logits, save_logits)
    res.update(seconds=seconds, command=[str(c) for c in cmd])
    return res


def answer(fork: Fork, model: Path, task: TaskFile, s: Scoring, log: Path, env: dict) -> dict:
    """model's answers to every question of task (parse.parse_answers), with the command and time;
    llama-perplexity's output goes to log."""
    cmd = [fork.binary("llama-perplexity"), "-m", model, "-bf" if task.mode == "mc" else "-f", task.path,
           MODES[task.mode], "-c", str(TASK_CTX), "-t", str(s.threads)]
    if s.gpu_layers is not None:
        cmd += ["-ngl", str(s.gpu_layers)]
    with open(log, "w", encoding="utf-8") as f:
        rc, seconds = run_logged(cmd, f, env=clean_env(env), cwd=log.parent)
    if rc != 0:
        raise ToolError(f"llama-perplexity {MODES[task.mode]} exited with code {rc}: {_reason(log)}", log)
    try:
        res = parse_answers(task.mode, read_text(log))
    except OrchestrateError as e:
        raise ToolError(f"{task.label}: {e}", log) from None
    if res["questions"] != task.questions:
        raise ToolError(f"{task.label}: llama-perplexity asked {res['questions']} questions where "
                        f"{task.questions} were expected", log)
    res.update(task=task.label, sha256=task.sha256, seconds=seconds, command=[str(c) for c in cmd])
    return res


def seconds_per_token(fork: Fork, model: Path, s: Scoring, env: dict) -> float:
    """Seconds per scored token of one chunk of model, run as a study would run it (a real run)."""
    t0 = time.monotonic()
    res = subprocess.run([str(c) for c in command(fork, model, s, chunks=1)], capture_output=True, env=clean_env(env))
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        tail = res.stdout.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise OrchestrateError(f"calibration run of llama-perplexity failed: {tail[0][-200:]}")
    return seconds / s.ctx
