"""Reading GGUF files back: tensors, their types and the stored values of Q4_0/Q8_0 blocks.

Owns the memory maps. Tensors are read through the gguf package's memory map, a slab of
rows at a time, so a large model is never held in RAM; release() drops a file's map so
that deleting the file frees its disk space at once. scan(), the sweep's one pass over a
whole file, reads with plain reads instead (stream.py), leaving nothing mapped or cached.
Value order is logical (element j, j+1, ...): in a Q4_0 block, element j is the low nibble
of byte j and element j+16 the high nibble.
"""

import functools
import gc
import hashlib
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import zstandard

from .. import stream
from ..errors import OrchestrateError

RUN_BINS = 16
Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
BLOCK = {t: gguf.GGML_QUANT_SIZES[t] for t in (Q4_0, Q8_0)}  # elements, bytes per block
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
SLAB_ELEMENTS = 1 << 20  # elements decoded at a time: bounds memory whatever the model size


class RawArray(gguf.ReaderField):
    """An array field kept as its raw bytes: parts end with (element type, element count, payload)."""

    def contents(self, index_or_slice=slice(None)):
        raise OrchestrateError(f"{self.name}: an array field is kept raw by orchestrate's GGUF reader")


def array_length(field) -> int:
    return int(field.parts[-2][0])


class _Reader(gguf.GGUFReader):
    """gguf's reader, made fast enough to open every variant of a sweep:

    - it slices a plain ndarray view of its memory map instead of the np.memmap itself (numpy's
      memmap bookkeeping on each small field is slow);
    - an array field (a tokenizer's 10^5 tokens, scores, merges) is one raw part, not one or two
      numpy views per element: the field's bytes, and so the model's tensor key, are unchanged,
      but its contents are not decoded (RawArray; array_length() gives the count).

    Relies on GGUFReader._get, _get_field_parts and _push_field (gguf is pinned <1 in
    pyproject.toml for this; tests/test_analysis.py checks the fields against gguf's own reader)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        arr = plain[offset:offset + dt.itemsize * int(count)].view(dt)[:int(count)]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        itype, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        offs, n, sub = orig_offs + 12, int(count[0]), gguf.GGUFValueType(int(itype[0]))
        scalar = self.gguf_scalar_to_np.get(sub)
        if scalar is not None:
            size = n * np.dtype(scalar).itemsize
        elif sub == gguf.GGUFValueType.STRING:
            little = (sys.byteorder == "little") != (self.byte_order == "S")  # "S": the file's order is swapped
            length = struct.Struct(("<" if little else ">") + "Q")
            pos, buf = offs, self.__dict__["_plain"].data  # set by the _get calls above
            for _ in range(n):
                pos += 8 + length.unpack_from(buf, pos)[0]
            size = pos - offs
        else:  # arrays of arrays: gguf's own walk
            return super()._get_field_parts(orig_offs, raw_type)
        payload = self._get(offs, np.uint8, size)
        if len(payload) != size:
            raise ValueError(f"array field runs past the end of the file ({size} bytes)")
        return 12 + size, [itype, count, payload], [2], [gguf.GGUFValueType.ARRAY, sub]

    def _push_field(self, field, skip_sum=False):
        array = gguf.GGUFValueType.ARRAY
        if len(field.types) == 2 and field.types[0] == array and field.types[1] != array:  # ours, above
            field = RawArray(*field)
        return super()._push_field(field, skip_sum)


_open: dict[Path, tuple[tuple[int, int], gguf.GGUFReader]] = {}
_KEEP_OPEN = 4


def open_model(path: Path) -> gguf.GGUFReader:
    """A memory-mapped reader, shared while the file is unchanged: gguf's reader spends
    seconds parsing a tokenizer's metadata, so each file is opened once per process."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise OrchestrateError(f"cannot read {path}: {e.strerror}") from None
    key = (st.st_size, st.st_mtime_ns)
    hit = _open.get(path)
    if hit and hit[0] == key:
        return hit[1]
    release(path)
    try:
        reader = _Reader(path)
    except Exception as e:  # gguf raises ValueError, struct/numpy errors, ... on a bad file
        raise OrchestrateError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    while len(_open) >= _KEEP_OPEN:
        release(next(iter(_open)))
    _open[path] = (key, reader)
    return reader


def release(path: Path) -> None:
    """Forget a file's reader and unmap it (once no tensor view of it is left)."""
    if _open.pop(Path(path).resolve(), None) is not None:
        gc.collect()  # the reader's tensors reference it in cycles: collect now, not some time later


def is_matrix(t) -> bool:
    return len([d for d in t.shape if d > 1]) >= 2


def matrix_types(reader: gguf.GGUFReader) -> set[str]:
    """The GGML types of a model's weight matrices."""
    return {t.tensor_type.name for t in reader.tensors if is_matrix(t)}


def file_type(reader: gguf.GGUFReader) -> str | None:
    """llama's file type of a model (e.g. "Q4_1", "Q4_K_M"), when its header says."""
    field = reader.get_field("general.file_type")
    if field is None:
        return None
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError):
        return None


def hooked_tensors(reader: gguf.GGUFReader) -> list:
    return [t for t in reader.tensors if t.tensor_type in BLOCK]


def row_length(t) -> int:
    return int(t.shape[0])  # gguf lists ne[0] (elements in a row) first


def blocks(t) -> np.ndarray:
    """The tensor's raw blocks as a (n_blocks, bytes_per_block) uint8 view."""
    _, nbytes = BLOCK[t.tensor_type]
    return np.asarray(t.data).reshape(-1).view(np.uint8).reshape(-1, nbytes)


def decode(t, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales as float16 (n,), values as int8 (n, 32) in logical order) of raw blocks b."""
    scales = b[:, :2].copy().view(np.float16).reshape(-1)
    if t.tensor_type == Q4_0:
        qs = b[:, 2:]
        vals = np.concatenate([(qs & 0x0F), (qs >> 4)], axis=1).astype(np.int8) - 8
    else:
        vals = b[:, 2:].view(np.int8)
    return scales, vals


def slabs(t):
    """(scales, values) of whole rows at a time, bounded in memory."""
    b = blocks(t)
    per_row = row_length(t) // 32
    rows = max(1, SLAB_ELEMENTS // row_length(t))
    for start in range(0, b.shape[0], rows * per_row):
        yield decode(t, b[start:start + rows * per_row])


def run_lengths(vals: np.ndarray, row_len: int) -> np.ndarray:
    """Lengths of the runs of consecutive zeros, in logical order, restarting at every row."""
    z = (vals.reshape(-1, row_len) == 0).astype(np.int8)
    padded = np.zeros((z.shape[0], row_len + 2), dtype=np.int8)
    padded[:, 1:-1] = z
    d = np.diff(padded.reshape(-1))
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


def zero_runs(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """(counts of runs of 1..15 and >=16 zeros, pieces of at most 16 the long runs make) of run lengths."""
    long = lengths[lengths >= RUN_BINS]
    return (np.bincount(np.minimum(lengths, RUN_BINS) - 1, minlength=RUN_BINS)[:RUN_BINS],
            int(((long + RUN_BINS - 1) // RUN_BINS).sum()))


@dataclass
class Hist:
    values: np.ndarray      # counts per bin
    zero_runs: np.ndarray   # runs of 1..15, >=16
    bin_min: int
    long_run_pieces: int    # the runs of >=16 cut into pieces of at most 16: how many pieces

    @property
    def elements(self) -> int:
        return int(self.values.sum())


def tensor_hist(t, codes_of=None) -> Hist:
    """Value and zero-run histogram of one Q4_0/Q8_0 tensor, as the hooks count them.

    codes_of: for Q8_0 written with a table, maps stored level (+128) to code (+8).
    """
    plain_q8 = t.tensor_type == Q8_0 and codes_of is None
    nbins, bin_min = (256, -128) if plain_q8 else (16, -8)
    values = np.zeros(nbins, dtype=np.int64)
    runs = np.zeros(RUN_BINS, dtype=np.int64)
    pieces = 0
    for _, vals in slabs(t):
        idx = vals.astype(np.int16).reshape(-1) - bin_min
        if codes_of is not None:
            idx = codes_of[vals.astype(np.int16).reshape(-1) + 128]
        values += np.bincount(idx, minlength=nbins)
        r, p = zero_runs(run_lengths(vals, row_length(t)))
        runs, pieces = runs + r, pieces + p
    return Hist(values, runs, bin_min, pieces)


def model_stats(path: Path) -> dict:
    """Tensor elements, tensor data bytes, bits per weight, and the main type of a GGUF file:
    the type holding most of its weight-matrix elements (Q4_K for a Q4_K_M file)."""
    reader = open_model(path)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        if is_matrix(t):
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements)
    main = max(by_type, key=by_type.get) if by_type else None
    return {"elements": elements, "tensor_bytes": nbytes, "bpw": 8 * nbytes / elements if elements else None,
            "main_type": main, "types": dict(sorted(by_type.items()))}


DESCRIPTIVE_KEYS = ("GGUF.", "general.", "quantize.")  # counts, names, file type, imatrix notes
# zstd's level 1: on quantized tensors it compresses as well as level 3 or better (the demo's
# Q4_0/Q8_0 within 0.1%, its zero-radius and table variants 2-7% smaller) at 1.5-5 times the speed
ZSTD_LEVEL = 1
SCAN_FORMAT = 2  # bump when what scan() measures changes (kept per base, part of each run's key)
ZSTD_BUDGET = 256 << 20  # bytes of tensor data compressed to measure zstd: all of them below this
SEGMENT = 1 << 20        # above it, evenly spaced segments of this size from every tensor


def measurement() -> dict:
    """How this code measures sizes: written into results.json, so that a report drawn later describes
    the sweep as it was measured, whatever the constants are then."""
    return {"zstd_level": ZSTD_LEVEL, "zstd_budget_bytes": ZSTD_BUDGET, "segment_bytes": SEGMENT,
            "scan_format": SCAN_FORMAT}


def _segments(n: int, fraction: float) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of a tensor of n bytes that are compressed: all of it, or
    round(n * fraction / SEGMENT) segments (at least one) spread evenly over it."""
    if fraction >= 1 or n <= SEGMENT:
        return [(0, n)]
    k = min(n // SEGMENT, max(1, round(n * fraction / SEGMENT)))
    return [(i * n // k, i * n // k + SEGMENT) for i in range(k)]


def _scan_tensor(path: Path, fraction: float, offset: int, n: int) -> tuple[bytes, int, int]:
    """(sha256 of the tensor's bytes, bytes compressed, their zstd size), in one read."""
    h = hashlib.sha256()
    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    segs = _segments(n, fraction)
    pos = sampled = zbytes = 0
    try:
        for block in stream.read_span(path, offset, n):
            h.update(block)
            view = memoryview(block)  # slices without copies
            for a, b in segs:
                lo, hi = max(a, pos), min(b, pos + len(block))
                if lo < hi:
                    zbytes += len(comp.compress(view[lo - pos:hi - pos]))
                    sampled += hi - lo
            pos += len(block)
    except EOFError as e:
        raise OrchestrateError(str(e)) from None
    return h.digest(), sampled, zbytes + len(comp.flush())


def scan(path: Path, budget: int = ZSTD_BUDGET) -> dict:
    """One read of a model's tensor data, in parallel over tensors, for:

    - tensor_key: sha256 of what the model computes with: every tensor's name, type, shape and data
      bytes, and the metadata other than descriptive keys. Two files with the same key score the
      same (stock Q4_0 and radius 0 do).
    - zstd_bpw: the data's zstd (ZSTD_LEVEL) size in bits per weight, each tensor compressed on its
      own. Above `budget` bytes it is estimated from evenly spaced segments of every tensor
      (zstd_sampled: the fraction compressed), scaled by each tensor's size.
    """
    reader = open_model(path)
    h = hashlib.sha256()
    for name, field in reader.fields.items():
        if name == "general.architecture" or not name.startswith(DESCRIPTIVE_KEYS):
            for part in field.parts:
                h.update(np.ascontiguousarray(part).view(np.uint8).tobytes())
    tensors = reader.tensors
    total = sum(int(t.n_bytes) for t in tensors)
    fraction = min(1.0, budget / total) if total else 1.0
    work = functools.partial(_scan_tensor, path, fraction)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # hashlib and zstd release the GIL
        parts = list(pool.map(work, [int(t.data_offset) for t in tensors], [int(t.n_bytes) for t in tensors]))
    estimate = sampled = 0.0
    for t, (digest, took, zbytes) in zip(tensors, parts):
        h.update(f"{t.name}\0{t.tensor_type.name}\0{list(map(int, t.shape))}\0".encode() + digest)
        sampled += took
        estimate += zbytes * int(t.n_bytes) / took if took else 0
    elements = sum(int(t.n_elements) for t in tensors)
    return {"tensor_key": h.hexdigest(), "zstd_bpw": 8 * estimate / elements if elements else None,
            "zstd_sampled": sampled / total if total else 1.0}
