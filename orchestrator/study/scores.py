"""Per-token scores that the fork's llama-perplexity writes when $PABLO_SCORES names a file
(patch 0004): each scored token's negative log-likelihood and, in KL-divergence mode, its KL
divergence from the base and whether its top token matched the base's. The file format is
documented in the patch's tools/perplexity/pablo-scores.h.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OrchestrateError

MAGIC, VERSION = b"PABLOSCR", 1
HEADER = struct.Struct("<8sIIIIIIQQQQ64s")  # 128 bytes; then 8-byte array names, then the arrays


@dataclass(frozen=True)
class Scores:
    path: Path
    n_chunk: int
    n_ctx: int
    per_chunk: int       # tokens scored in each chunk (the second half of its window, minus one)
    text_hash: int       # of the token ids of the scored chunks: the text as the model saw it
    model: str           # llama's description of the model, e.g. "llama 256M Q4_0"
    arrays: dict         # "nll" (and "kld", "top"): float32 (n_chunk, per_chunk)

    @property
    def n_tokens(self) -> int:
        return self.n_chunk * self.per_chunk

    def setting(self) -> tuple:
        return self.n_chunk, self.n_ctx, self.per_chunk, self.text_hash


@dataclass(frozen=True)
class Header:
    n_arrays: int
    n_chunk: int
    n_ctx: int
    per_chunk: int
    n_tokens: int
    text_hash: int
    n_params: int        # the model's parameters, as llama counts them
    model: str           # llama's description of the model


def _header(head: bytes, path: Path) -> Header:
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise OrchestrateError(f"{path} is not a per-token scores file")
    (_, version, n_arrays, n_chunk, n_ctx, per_chunk, _, n_tokens, text_hash, n_params, _, desc) = HEADER.unpack_from(head)
    if version != VERSION:
        raise OrchestrateError(f"{path} is a version {version} scores file; this orchestrate reads version {VERSION}")
    return Header(n_arrays, n_chunk, n_ctx, per_chunk, n_tokens, text_hash, n_params,
                  desc.rstrip(b"\0").decode("utf-8", "replace"))


def _bytes(path: Path, size: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size if size is not None else -1)
    except OSError as e:
        raise OrchestrateError(f"cannot read per-token scores {path}: {e.strerror}") from None


def read_header(path: Path) -> Header:
    """A scores file's header alone, checked (the arrays are not read)."""
    return _header(_bytes(path, HEADER.size), Path(path))


def read(path: Path) -> Scores:
    """A scores file, checked; one-line errors for anything else."""
    path = Path(path)
    data = _bytes(path)
    h = _header(data, path)
    start = HEADER.size + 8 * h.n_arrays
    if h.n_tokens != h.n_chunk * h.per_chunk or len(data) != start + 4 * h.n_tokens * h.n_arrays:
        raise OrchestrateError(f"{path} is truncated or damaged ({len(data)} bytes for {h.n_tokens} tokens)")
    arrays = {}
    for k in range(h.n_arrays):
        name = data[HEADER.size + 8 * k:HEADER.size + 8 * (k + 1)].rstrip(b"\0").decode("ascii", "replace")
        values = np.frombuffer(data, "<f4", h.n_tokens, start + 4 * h.n_tokens * k).reshape(h.n_chunk, h.per_chunk)
        if not np.isfinite(values).all():
            raise OrchestrateError(f"{path}: {name} has values that are not finite")
        arrays[name] = values
    return Scores(path, h.n_chunk, h.n_ctx, h.per_chunk, h.text_hash, h.model, arrays)


def check_paired(a: Scores, b: Scores) -> None:
    """Two score files can be paired only when they scored the same tokens the same way."""
    if a.setting() != b.setting():
        raise OrchestrateError(f"{a.path.name} and {b.path.name} were not scored on the same tokens "
                               f"({a.n_chunk}x{a.n_ctx} vs {b.n_chunk}x{b.n_ctx} tokens, "
                               f"text {a.text_hash:016x} vs {b.text_hash:016x}): they cannot be paired")
