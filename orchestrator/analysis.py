"""Read quantized weights back from a GGUF file and measure them in Python.

Tensors are read through the gguf package's memory map, a slab of rows at a time, so a
large model is never held in RAM. Value order is logical (element j, j+1, ...): in a
Q4_0 block, element j is the low nibble of byte j and element j+16 the high nibble.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import OrchestrateError

RUN_BINS = 16
Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
BLOCK = {Q4_0: (32, 18), Q8_0: (32, 34)}  # elements, bytes per block
SLAB_ELEMENTS = 1 << 20  # elements decoded at a time: bounds memory whatever the model size


def open_model(path: Path) -> gguf.GGUFReader:
    """A memory-mapped reader, shared while the file is unchanged: gguf's reader spends
    seconds parsing a tokenizer's metadata, so each file is opened once per process."""
    path = Path(path).resolve()
    st = path.stat()
    return _open(path, st.st_size, st.st_mtime_ns)


class _Reader(gguf.GGUFReader):
    """gguf's reader, slicing a plain ndarray view of its memory map instead of the np.memmap
    itself: numpy's memmap bookkeeping on each of a tokenizer's ~10^5 small fields is what
    makes opening slow (3x faster here; same fields, same tensors, still memory-mapped)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        arr = plain[offset:offset + dt.itemsize * int(count)].view(dt)[:int(count)]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


@functools.lru_cache(maxsize=4)
def _open(path: Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
    try:
        return _Reader(path)
    except Exception as e:
        raise OrchestrateError(f"{path} is not a readable GGUF file: {e}") from None


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


def zero_runs(vals: np.ndarray, row_len: int) -> np.ndarray:
    """Counts of runs of 1..15 and >=16 consecutive zeros, restarting at every row."""
    lengths = run_lengths(vals, row_len)
    return np.bincount(np.minimum(lengths, RUN_BINS) - 1, minlength=RUN_BINS)[:RUN_BINS]


@dataclass
class Hist:
    values: np.ndarray      # counts per bin
    zero_runs: np.ndarray   # runs of 1..15, >=16
    bin_min: int

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
    for _, vals in slabs(t):
        idx = vals.astype(np.int16).reshape(-1) - bin_min
        if codes_of is not None:
            idx = codes_of[vals.astype(np.int16).reshape(-1) + 128]
        values += np.bincount(idx, minlength=nbins)
        runs += zero_runs(vals, row_length(t))
    return Hist(values, runs, bin_min)


def model_stats(path: Path) -> dict:
    """Tensor elements, tensor data bytes and bits per weight of a GGUF file."""
    reader = open_model(path)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    return {"elements": elements, "tensor_bytes": nbytes, "bpw": 8 * nbytes / elements if elements else None}


# ---- compressibility, measured from the file ------------------------------------------

ZSTD_LEVEL = 3
RUN_TOKEN_MAX = 16  # the simple zero-run-length code: runs of 1..16 per token


def value_counts(t) -> tuple[np.ndarray, int]:
    """(counts of stored values, bin_min) of a Q4_0/Q8_0 tensor, slab by slab.

    The value bytes are counted two at a time (as uint16: half the work for np.bincount, which
    widens its input), then folded into byte counts, and Q4_0 bytes into their two nibbles."""
    b = blocks(t)
    if b.size < (1 << 21):  # small tensor: folding 65536 pair counts would cost more than it saves
        counts = np.bincount(b[:, 2:].reshape(-1), minlength=256)
    else:
        step = max(1, SLAB_ELEMENTS // 32)
        pairs = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, b.shape[0], step):
            qs = np.ascontiguousarray(b[start:start + step, 2:])  # the value bytes: an even count per block
            pairs += np.bincount(qs.view(np.uint16).reshape(-1), minlength=1 << 16)
        grid = pairs.reshape(256, 256)  # [second byte, first byte]
        counts = grid.sum(axis=0) + grid.sum(axis=1)
    if t.tensor_type == Q4_0:
        nib = np.zeros(16, dtype=np.int64)
        np.add.at(nib, np.arange(256) & 0x0F, counts)
        np.add.at(nib, np.arange(256) >> 4, counts)
        return nib, -8
    return np.roll(counts, 128), -128  # byte 0x80.. are -128..-1


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def rle_bits(t) -> int:
    """Bits of the tensor's values under a simple zero-run-length code, row by row: a nonzero
    value is a token of 1 flag bit + the stored width (4 or 8 bits), a run of zeros is 1 flag bit
    + 4 bits of length (1..16), longer runs taking several tokens."""
    width = 4 if t.tensor_type == Q4_0 else 8
    n = row_length(t)
    literal = run_tokens = 0
    for _, vals in slabs(t):
        lengths = run_lengths(vals, n)
        literal += int(vals.size - lengths.sum())
        run_tokens += int(((lengths + RUN_TOKEN_MAX - 1) // RUN_TOKEN_MAX).sum())
    return literal * (1 + width) + run_tokens * (1 + 4)


def compressibility(path: Path, qtype: str) -> dict:
    """Entropy, zero share and run-length size of the values of the variant's main type
    (`qtype`), and the zstd-compressed size of all tensor data, in bits per weight."""
    import zstandard
    reader = open_model(path)
    main = gguf.GGMLQuantizationType[qtype.upper()]
    counts, bin_min, rle, n_main = None, 0, 0, 0
    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    zbytes = elements = 0
    for t in reader.tensors:
        elements += int(t.n_elements)
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        step = 1 << 24
        for start in range(0, raw.size, step):
            zbytes += len(comp.compress(raw[start:start + step]))
        if t.tensor_type == main and main in BLOCK:
            c, bin_min = value_counts(t)
            counts = c if counts is None else counts + c
            rle += rle_bits(t)
            n_main += int(t.n_elements)
    zbytes += len(comp.flush())
    out = {"zstd_bpw": 8 * zbytes / elements, "entropy_bpw": None, "rle_bpw": None, "main_zero_fraction": None}
    if counts is not None:
        out.update(entropy_bpw=entropy_bits(counts), rle_bpw=rle / n_main,
                   main_zero_fraction=float(counts[-bin_min] / counts.sum()))
    return out


# ---- where the damage is ---------------------------------------------------------------

def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer, kind) of a tensor name: blk.3.attn_q.weight -> (3, "attn_q")."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, parts[0]


def _dequantize(rows: np.ndarray, t, n: int) -> np.ndarray:
    """float32 weights of a slab of rows: our block decoder for Q4_0/Q8_0, gguf's for the rest."""
    from gguf.quants import dequantize
    if t.tensor_type in BLOCK:
        scales, vals = decode(t, rows.reshape(-1).view(np.uint8).reshape(-1, BLOCK[t.tensor_type][1]))
        return (vals.astype(np.float32) * scales.astype(np.float32)[:, None]).reshape(-1, n)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return rows.reshape(-1, n).astype(np.float32)
    return dequantize(rows, t.tensor_type).reshape(-1, n).astype(np.float32)


def damage(base: Path, quant: Path) -> dict:
    """Per tensor: RMSE of the quantized weights against the base, relative to the base
    tensor's RMS; computed a slab of rows at a time. Also the whole model's relative RMSE."""
    b_reader, q_reader = open_model(base), open_model(quant)
    base_t = {t.name: t for t in b_reader.tensors}
    rows, err_total, ref_total = [], 0.0, 0.0
    for qt in q_reader.tensors:
        bt = base_t.get(qt.name)
        if bt is None or len([d for d in qt.shape if d > 1]) < 2:
            continue
        n = row_length(qt)
        qd, bd = np.asarray(qt.data), np.asarray(bt.data)
        qd, bd = qd.reshape(-1, qd.shape[-1]), bd.reshape(-1, bd.shape[-1])
        step = max(1, SLAB_ELEMENTS // n)
        err = ref = 0.0
        for start in range(0, qd.shape[0], step):
            q = _dequantize(qd[start:start + step], qt, n)
            r = _dequantize(bd[start:start + step], bt, n)
            err += float(np.square(q - r).sum(dtype=np.float64))
            ref += float(np.square(r).sum(dtype=np.float64))
        layer, kind = tensor_kind(qt.name)
        rows.append({"name": qt.name, "layer": layer, "kind": kind, "type": qt.tensor_type.name,
                     "rel_rmse": (err / ref) ** 0.5 if ref else 0.0})
        err_total, ref_total = err_total + err, ref_total + ref
    return {"tensors": rows, "model_rel_rmse": (err_total / ref_total) ** 0.5 if ref_total else 0.0}
