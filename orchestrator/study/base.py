"""The base model of a study: the float model every variant is quantized from, made once.

A user's model enters here and leaves as one Base (path, sha256, weight types, and the
quantized model it was upcast from, if any), which every later step takes as it is. A
model whose weights are already quantized gets an F16 upcast made once and cached, and
every report says so.
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import OrchestrateError
from ..fetch import sha256_of
from ..files import check_input_file, memoized, read_json, write_json
from ..fork.build import Fork
from ..tools.quantize import run_quantize
from . import analysis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    path: Path                  # the float model variants are quantized from
    sha256: str
    types: tuple[str, ...]      # GGML types of its weight matrices
    source: Path                # the model the user named (== path unless upcast)
    source_sha256: str
    upcast_from: str | None     # the source's quantization (e.g. "Q4_1") when path is its F16 upcast


def file_id(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a 13 GB model is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    memo = paths.cache_dir() / "model-ids.json"
    try:
        known = read_json(memo)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        if st.st_size > 1 << 30:  # minutes for a 70B model: say why nothing else happens meanwhile
            logger.info(f"note: reading {path.name} ({st.st_size / 1e9:.1f} GB) once to identify it (sha256)")
        known[key] = sha256_of(path)
        write_json(memo, known)
    return known[key]


def describe(path: Path, sha256: str) -> tuple[tuple[str, ...], str | None]:
    """(weight-matrix types, llama file type) of a model, read from its header once per content
    (gguf takes seconds to parse a tokenizer)."""
    def read():
        reader = analysis.open_model(path)
        return {"types": sorted(analysis.matrix_types(reader)), "ftype": analysis.file_type(reader)}
    return memoized(paths.cache_dir() / "model-types" / f"{sha256}.json", read,
                    lambda d: (tuple(d["types"]), d["ftype"]))


def scanned(base: Base) -> dict:
    """analysis.scan of a base (its tensor key and zstd size), once per content."""
    return memoized(paths.cache_dir() / "model-scans" / f"{base.sha256}-{analysis.SCAN_FORMAT}.json",
                    lambda: analysis.scan(base.path))


def upcast_path(model: Path, sha: str) -> Path:
    """Where the F16 upcast of a quantized model is kept."""
    return paths.cache_dir() / "bases" / f"{sha[:16]}-{Path(model).stem}-F16.gguf"


def quantized_types(types) -> list[str]:
    """The weight types of a model that are not float (a base needs an F16 upcast when there are any)."""
    return sorted(t for t in types if t not in analysis.FLOAT_TYPES)


def needs_upcast(model: Path) -> bool:
    """A quantized model whose F16 upcast is not made yet."""
    sha = file_id(model)
    return bool(quantized_types(describe(model, sha)[0])) and not upcast_path(model, sha).exists()


def prepare_base(model: Path, fork: Fork) -> Base:
    """The model itself if its weights are float; else its F16 upcast, made once and cached."""
    model = check_input_file(model, "model")
    sha = file_id(model)
    types, ftype = describe(model, sha)
    quantized = quantized_types(types)
    if not types:
        raise OrchestrateError(f"{model} has no weight matrices: not a model to quantize")
    if not quantized:
        return Base(model.resolve(), sha, types, model.resolve(), sha, None)
    dest = upcast_path(model, sha)
    label = ftype or "/".join(quantized)
    if not dest.exists():
        logger.info(f"note: {model.name} is already quantized ({label}); making an F16 upcast of it as the base "
                    f"(its 'F16' results describe an upcast of a {label} model)")
        run_quantize(fork, model, dest, "F16", extra=["--allow-requantize"], log_path=dest.with_suffix(".log"))
    up_sha = file_id(dest)
    return Base(dest, up_sha, describe(dest, up_sha)[0], model.resolve(), sha, label)


def _histogram_path(fork, base_id: str) -> Path:
    return paths.cache_dir() / "q8_0-hist" / f"{base_id[:16]}-{fork.id}.json"


def tensor_histograms(fork, base_id: str) -> dict[str, np.ndarray]:
    """Each Q8_0 tensor's own value histogram, from the measured model histogram's file."""
    return {t["name"]: np.array(t["values"], dtype=np.int64)
            for t in read_json(_histogram_path(fork, base_id)).get("tensors", []) if t.get("type") == "q8_0" and t.get("values")}


def weighted_histogram(fork, base: Path, base_id: str, im, threads: int | None = None) -> np.ndarray:
    """The base's plain-Q8_0 value histogram with every weight counted by its column's importance (the
    imatrix's mean squared activation of that input). Each tensor's importances are scaled to mean 1, so
    that a tensor weighs what it does in the plain histogram and only the weights within it move; tensors
    the imatrix does not cover count plainly. Cached by base, importance matrix and build."""
    dest = paths.cache_dir() / "q8_0-hist" / f"{base_id[:16]}-{im.sha256[:16]}-{fork.id}-weighted.json"
    if dest.exists():
        return np.array(read_json(dest)["values"])
    reader = analysis.open_model(im.path)
    sums = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    dest.parent.mkdir(parents=True, exist_ok=True)
    hist = np.zeros(256)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        q8 = Path(tmp) / "q8_0.gguf"
        run_quantize(fork, base, q8, "Q8_0", threads=threads, progress=False, log_path=Path(tmp) / "quantize.log")
        for t in analysis.hooked_tensors(analysis.open_model(q8)):
            n = analysis.row_length(t)
            s2, count = sums.get(f"{t.name}.in_sum2"), sums.get(f"{t.name}.counts")
            w = np.ones(n) if s2 is None or len(s2) != n or count is None or count[0] <= 0 else s2 / count[0]
            w = w / w.mean() if w.mean() > 0 else np.ones(n)
            for _, vals in analysis.slabs(t):
                v = vals.reshape(-1, n).astype(np.int64) + 128
                hist += np.bincount(v.ravel(), weights=np.broadcast_to(w, v.shape).ravel(), minlength=256)
        analysis.release(q8)
    write_json(dest, {"values": hist.tolist(), "imatrix": str(im.path)})
    return hist


def cached_histogram(fork, base_id: str) -> np.ndarray | None:
    """The model's Q8_0 value histogram if it was measured already (nothing is run)."""
    dest = _histogram_path(fork, base_id)
    return np.array(read_json(dest)["model"]["q8_0"]["values"], dtype=np.int64) if dest.exists() else None


def measured_histogram(fork, base: Path, base_id: str, threads: int | None = None) -> np.ndarray:
    """The model's plain-Q8_0 value histogram, from the hooks (quantized once, cached)."""
    dest = _histogram_path(fork, base_id)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            run_quantize(fork, base, Path(tmp) / "q8_0.gguf", "Q8_0", hist=dest, threads=threads,
                         progress=False, log_path=Path(tmp) / "quantize.log")
    return cached_histogram(fork, base_id)
