"""Measurements of a quantized model: the coded size of its stored values, weight error against
its base, and the zero statistics, from the hooks' histograms and sums (with the recounts from the
file that check them).

Works for any llama-quantize type: what needs Q4_0/Q8_0 blocks (value entropy, zero runs)
is measured for those and None (not applicable) otherwise; weight error is measured for
every tensor type the gguf package can dequantize and None for the rest.
"""

from pathlib import Path

import gguf
import numpy as np

from .analysis import (BLOCK, Q4_0, RUN_BINS, SLAB_ELEMENTS, blocks, decode, is_matrix, open_model, row_length,
                       run_lengths, slabs)

RUN_TOKEN_MAX = RUN_BINS  # the simple zero-run-length code: runs of 1..16 per token (the hooks' long-run pieces)


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


def coded_sizes(hist: dict, main_type: str | None) -> dict:
    """Entropy and run-length size (bits per weight) of the main type's stored values, from the
    hooks' histograms; None where the hooks did not count that type (stored values are what they
    count: table codes map one to one to stored levels, so the entropy is the same)."""
    m = _counted(hist, main_type)
    if m is None:
        return {"entropy_bpw": None, "rle_bpw": None}
    n, zeros = m["elements"], _zeros(hist, m)
    width = 4 if main_type.upper() == "Q4_0" else 8
    tokens = sum(m["zero_runs"][:-1]) + m["long_run_pieces"]  # one per run of 1..15, one per piece of the rest
    return {"entropy_bpw": entropy_bits(np.array(m["values"])),
            "rle_bpw": ((n - zeros) * (1 + width) + tokens * (1 + 4)) / n}


def code_bits(hist: dict, bpw: float, elements: int) -> dict:
    """Bits per weight of a table variant as 4-bit codes: each table-coded Q8_0 block as 16 codes' worth of
    4-bit values plus its scale (4.5 bits per weight, not Q8_0's 8.5), the rest as stored, plus the tables
    themselves (16 one-byte levels each: table_bpw). None for a model no table coded."""
    coded = [t for t in hist.get("tensors", []) if t.get("bins") == "code"]
    if not coded or not elements:
        return {"table_bpw": None, "code_bpw": None}
    tables = {tuple(_coding_table(hist, t)["level"]) for t in coded}
    table_bpw = len(tables) * 16 * 8 / elements
    return {"table_bpw": table_bpw, "code_bpw": bpw - 4 * sum(t["elements"] for t in coded) / elements + table_bpw}


def recount(path: Path, main_type: str | None) -> dict:
    """coded_sizes, counted again from the file by this module: the independent check of the
    hooks (tests and bench/), a pass over every stored value."""
    main = gguf.GGMLQuantizationType[main_type] if main_type in gguf.GGMLQuantizationType.__members__ else None
    counts, rle, n_main = None, 0, 0
    for t in open_model(path).tensors:
        if t.tensor_type == main and main in BLOCK:
            c, _ = value_counts(t)
            counts = c if counts is None else counts + c
            rle += rle_bits(t)
            n_main += int(t.n_elements)
    if counts is None:
        return {"entropy_bpw": None, "rle_bpw": None}
    return {"entropy_bpw": entropy_bits(counts), "rle_bpw": rle / n_main}


# ---- where the damage is ---------------------------------------------------------------

def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer, kind) of a tensor name: blk.3.attn_q.weight -> (3, "attn_q")."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, parts[0]


def _dequantize(rows: np.ndarray, t, n: int) -> np.ndarray:
    """float32 weights of a slab of rows: our block decoder for Q4_0/Q8_0, gguf's for the rest
    (NotImplementedError for a type gguf cannot decode)."""
    from gguf.quants import dequantize
    if t.tensor_type in BLOCK:
        scales, vals = decode(t, rows.reshape(-1).view(np.uint8).reshape(-1, BLOCK[t.tensor_type][1]))
        return (vals.astype(np.float32) * scales.astype(np.float32)[:, None]).reshape(-1, n)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return rows.reshape(-1, n).astype(np.float32)
    return dequantize(rows, t.tensor_type).reshape(-1, n).astype(np.float32)


def _tensor_error(qt, bt) -> tuple[float, float] | None:
    """(sum of squared errors, sum of squared base weights) of one tensor, or None when gguf
    cannot dequantize one of the two types."""
    n = row_length(qt)
    qd, bd = np.asarray(qt.data), np.asarray(bt.data)
    qd, bd = qd.reshape(-1, qd.shape[-1]), bd.reshape(-1, bd.shape[-1])
    step = max(1, SLAB_ELEMENTS // n)
    err = ref = 0.0
    try:
        for start in range(0, qd.shape[0], step):
            q = _dequantize(qd[start:start + step], qt, n)
            r = _dequantize(bd[start:start + step], bt, n)
            err += float(np.square(q - r).sum(dtype=np.float64))
            ref += float(np.square(r).sum(dtype=np.float64))
    except NotImplementedError:
        return None
    return err, ref


def damage(base: Path, quant: Path, hooks: dict | None = None) -> dict:
    """Per weight matrix: RMSE of the quantized weights against the base, relative to the base
    tensor's RMS (None where the type cannot be decoded); and the whole model's relative RMSE
    over the tensors that could (None if some could not: a partial figure would mislead).

    hooks: the histogram file of the quantization. Its per-tensor sums, measured by the hooks
    while quantizing, are used instead of a pass over both models; only a matrix the quantizer
    copied (no sums: error 0) is read, for its norm. Without it, everything is measured here:
    the independent check of the hooks' figures."""
    sums = {t["name"]: (t["sq_err"], t["sq_norm"]) for t in (hooks or {}).get("tensors", []) if "sq_err" in t}
    base_t = None
    rows, err_total, ref_total, complete = [], 0.0, 0.0, True
    for qt in open_model(quant).tensors:
        if not is_matrix(qt):
            continue
        e = sums.get(qt.name)
        if e is None:
            base_t = base_t or {t.name: t for t in open_model(base).tensors}
            bt = base_t.get(qt.name)
            if bt is None:
                continue
            e = _tensor_error(qt, bt)
        layer, kind = tensor_kind(qt.name)
        rel = None if e is None else ((e[0] / e[1]) ** 0.5 if e[1] else 0.0)
        rows.append({"name": qt.name, "layer": layer, "kind": kind, "type": qt.tensor_type.name, "rel_rmse": rel})
        if e is None:
            complete = False
        else:
            err_total, ref_total = err_total + e[0], ref_total + e[1]
    model = ((err_total / ref_total) ** 0.5 if ref_total else 0.0) if complete else None
    return {"tensors": rows, "model_rel_rmse": model}


def zero_stats(hist: dict, main_type: str | None) -> tuple[float | None, float | None]:
    """(share of zero values, share of the zeros that are isolated) of the variant's main
    type, from the hooks' histograms; (None, None) where the hooks did not count that type."""
    m = _counted(hist, main_type)
    if m is None:
        return None, None
    zeros = _zeros(hist, m)
    isolated = m["zero_runs"][0] / zeros if zeros else None
    return zeros / m["elements"], isolated


def tensor_zeros(hist: dict) -> dict[str, tuple[int, int]]:
    """(stored zeros, elements) of every tensor the hooks counted, by name."""
    return {t["name"]: (_zeros(hist, t), t["elements"]) for t in hist.get("tensors", []) if t.get("values")}


def _counted(hist: dict, main_type: str | None) -> dict | None:
    """The hooks' whole-model histogram of the main type, if they counted any of it."""
    m = hist.get("model", {}).get((main_type or "").lower())
    return m if m and m["elements"] else None


def _zeros(hist: dict, m: dict) -> int:
    """Stored zeros in one of the hooks' histograms (table codes: the code whose level is 0 in the
    table that coded them — the tensor's rule's, or the file's)."""
    if m["bins"] == "value":
        return m["values"][-m["bin_min"]]
    if "name" not in m and hist["config"].get("rules"):  # a model total over tensors with tables of their own
        return sum(_zeros(hist, t) for t in hist.get("tensors", []) if t.get("bins") == "code")
    table = _coding_table(hist, m)
    levels = table["level"] if table else []
    return m["values"][levels.index(0)] if 0 in levels else 0


def _coding_table(hist: dict, entry: dict) -> dict | None:
    """The table that coded a histogram entry: its tensor's rule's, or the file's."""
    rule = entry.get("rule")
    return hist["config"]["rules"][rule].get("table") if rule is not None else hist["config"].get("table")
