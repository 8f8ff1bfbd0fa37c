"""Reading a file once leaves the page cache as it was: checked with util-linux's fincore."""

import hashlib
import os
import subprocess

import pytest

from conftest import need_tool, optional
from orchestrator import stream
from orchestrator.fetch import sha256_of

MIB = 1 << 20


def cached_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache_first_half(path) -> None:
    """Another process reads the first half (without read-ahead, whose pages would still be arriving
    while the test measures)."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        f.read(32 * MIB)


@pytest.fixture
def big(tmp_path):
    need_tool("fincore", "util-linux")
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(64 * MIB))
    evict(path)
    optional("page-cache measurements", f"this file system keeps {path} cached whatever is asked (tmpfs?)"
             if cached_bytes(path) > MIB else None, "point TMPDIR at a directory on a disk, not tmpfs")
    return path


def test_a_hashed_file_leaves_the_page_cache_as_it_found_it(big):
    assert sha256_of(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    evict(big)  # (read_bytes cached it all)
    cache_first_half(big)
    assert cached_bytes(big) == 32 * MIB
    sha256_of(big)
    assert cached_bytes(big) == 32 * MIB
    with open(big, "rb") as f:  # the check can fail: a plain read leaves the whole file cached
        while f.read(16 * MIB):
            pass
    assert cached_bytes(big) == 64 * MIB


def test_spans_and_blocks_give_the_exact_bytes(big):
    data = big.read_bytes()
    for offset, n, block in ((0, 64 * MIB, 1 << 24), (12345, 5 * MIB + 7, 1 << 20), (64 * MIB - 10, 10, 4096)):
        assert b"".join(stream.read_span(big, offset, n, block)) == data[offset:offset + n]
    with pytest.raises(EOFError):
        list(stream.read_span(big, 64 * MIB - 10, 11))
