"""Reading a large file once (to hash or measure it) without holding it in memory or in the page cache.

A 70B model is 140 GB: scanning it through a memory map, or with plain reads left to the kernel,
fills the page cache charged to the orchestrating process's cgroup and evicts what llama-* tools
have cached. Here a file is read in blocks with plain reads (nothing stays mapped), and the pages
of a block that were not cached before it was read are dropped again once it is used, so the page
cache is left as it was found: what another process had cached stays cached.
"""

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK = 1 << 24
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def cached_pages(fd: int, start: int, length: int) -> np.ndarray | None:
    """Per page from the page-aligned `start`: is it in the page cache (mincore)? None where the
    kernel does not say (mincore only reports pages of files the caller owns or may write)."""
    try:
        mm = mmap.mmap(fd, length, offset=start, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        view = np.frombuffer(mm, np.uint8)
        vec = np.zeros(-(-length // PAGE), np.uint8)
        rc = _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(length),
                           vec.ctypes.data_as(ctypes.c_void_p))
        del view
        return (vec & 1).astype(bool) if rc == 0 else None
    finally:
        mm.close()


def _drop(fd: int, start: int, was_cached: np.ndarray | None, length: int) -> None:
    """Drop the pages of [start, start+length) that were not cached before (all of them when unknown)."""
    if was_cached is None:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([1], was_cached.astype(np.int8), [1]))))
    for a, b in zip(edges[::2], edges[1::2]):  # runs of pages that were not cached
        os.posix_fadvise(fd, start + int(a) * PAGE, int(b - a) * PAGE, os.POSIX_FADV_DONTNEED)


def _blocks(offset: int, end: int, size: int, block: int) -> list[tuple[int, int, int, int]]:
    """(read from, read to, page-aligned start, length to the page end) of each block."""
    out, pos = [], offset
    while pos < end:
        start = pos - pos % PAGE
        stop = min(end, start + block)
        out.append((pos, stop, start, min(-(-stop // PAGE) * PAGE, size) - start))
        pos = stop
    return out


def read_span(path: Path, offset: int, n: int, block: int = BLOCK) -> Iterator[bytes]:
    """The n bytes of the file at offset, a block at a time; each block's new pages are dropped
    from the page cache once the caller asks for the next one (or stops).

    Which pages were cached is noted for the next block too before a block is read: read-ahead
    (ours, or one set up by another reader of the file) brings in pages past the block being read."""
    with open(path, "rb", buffering=0) as f:
        fd, end = f.fileno(), offset + n
        size = os.fstat(fd).st_size
        if end > size:
            raise EOFError(f"{path} is truncated: {end} bytes needed, {size} present")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead of our own past each block
        blocks = _blocks(offset, end, size, block)
        before = [cached_pages(fd, *blocks[0][2:])] if blocks else []
        for k, (pos, stop, start, length) in enumerate(blocks):
            if k + 1 < len(blocks):
                before.append(cached_pages(fd, *blocks[k + 1][2:]))
            try:
                yield os.pread(fd, stop - pos, pos)
            finally:
                _drop(fd, start, before[k], length)
                before[k] = None
