"""llama-imatrix: an importance matrix for a model from a calibration text, made once per content (the
model's and the text's hashes, the settings and the fork build) and kept in the cache."""

import os
from dataclasses import dataclass
from pathlib import Path

import filelock

from ..errors import ToolError
from ..fetch import sha256_of
from ..files import read_text
from ..fork.build import Fork
from ..proc import clean_env, failure_reason, run_logged


@dataclass(frozen=True)
class Imatrix:
    path: Path
    sha256: str
    text: Path           # the calibration text
    text_sha256: str


def _path(fork: Fork, model_sha256: str, text_sha256: str, ctx: int, chunks: int, cache: Path) -> Path:
    return cache / "imatrix" / f"{model_sha256[:16]}-{text_sha256[:16]}-c{ctx}-n{chunks}-{fork.id}.gguf"


def cached(fork: Fork, model_sha256: str, text: Path, text_sha256: str, ctx: int, chunks: int,
           cache: Path) -> Imatrix | None:
    """The importance matrix make() would give, if it was made already; else None (for plans)."""
    path = _path(fork, model_sha256, text_sha256, ctx, chunks, cache)
    return Imatrix(path, sha256_of(path), Path(text).resolve(), text_sha256) if path.exists() else None


def make(fork: Fork, model: Path, model_sha256: str, text: Path, text_sha256: str, ctx: int, chunks: int,
         threads: int, env: dict, cache: Path, say=lambda what: None) -> Imatrix:
    """The importance matrix of model on text (-c ctx, at most `chunks` chunks): from the cache, or made
    now with llama-imatrix (written under a temporary name, moved in place when it succeeded)."""
    path = _path(fork, model_sha256, text_sha256, ctx, chunks, cache)
    d = path.parent
    d.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        if not path.exists():
            say(f"importance matrix of {Path(model).name} on {Path(text).name} ({chunks} chunks of {ctx})")
            tmp = path.with_name(f".{path.name}.partial.gguf")
            log = path.with_suffix(".log")
            cmd = [fork.binary("llama-imatrix"), "-m", model, "-f", text, "-o", tmp, "-c", str(ctx), "--chunks",
                   str(chunks), "-t", str(threads), "--no-ppl"]
            with open(log, "w", encoding="utf-8") as f:
                rc, _ = run_logged([str(c) for c in cmd], f, env=clean_env(env), cwd=d)
            if rc != 0 or not tmp.exists():
                tmp.unlink(missing_ok=True)
                raise ToolError(f"llama-imatrix exited with code {rc}: {failure_reason(read_text(log))}", log)
            os.replace(tmp, path)
    return Imatrix(path, sha256_of(path), Path(text).resolve(), text_sha256)
