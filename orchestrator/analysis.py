"""Read quantized weights back from a GGUF file and measure them in Python.

Tensors are read through the gguf package's memory map, a slab of rows at a time, so a
large model is never held in RAM. Value order is logical (element j, j+1, ...): in a
Q4_0 block, element j is the low nibble of byte j and element j+16 the high nibble.
"""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import OrchestrateError

RUN_BINS = 16
Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
BLOCK = {Q4_0: (32, 18), Q8_0: (32, 34)}  # elements, bytes per block
SLAB_ELEMENTS = 1 << 22


def open_model(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
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


def zero_runs(vals: np.ndarray, row_len: int) -> np.ndarray:
    """Counts of runs of 1..15 and >=16 consecutive zeros, restarting at every row."""
    z = (vals.reshape(-1, row_len) == 0).astype(np.int8)
    padded = np.zeros((z.shape[0], row_len + 2), dtype=np.int8)
    padded[:, 1:-1] = z
    d = np.diff(padded.reshape(-1))
    lengths = np.flatnonzero(d == -1) - np.flatnonzero(d == 1)
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
