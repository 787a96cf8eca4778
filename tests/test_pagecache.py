"""Page-cache hints request every byte of a range, however large (Linux serves one WILLNEED call only up to the
device's request limit and drops the rest)."""

import os
import time

import pytest

from slidefm.cohort import pagecache

PIECE = 3 * 4096


def _spy(monkeypatch):
    calls = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


def _evicted(path):
    pagecache.evict([path])
    if pagecache.resident_share([path]) > 0.05:
        pytest.skip("this filesystem keeps files cached after POSIX_FADV_DONTNEED (tmpfs?)")


@pytest.mark.parametrize("offset,length", [(0, 1), (4096, PIECE), (1000, 3 * PIECE + 7), (123, 0)])
def test_pieces_cover_the_range_exactly(tmp_path, monkeypatch, offset, length):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * (5 * PIECE + 11))
    monkeypatch.setattr(pagecache, "request_limit", lambda dev: PIECE)
    calls = _spy(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        pagecache.will_need(fd, offset, length)
    finally:
        os.close(fd)
    end = offset + length if length else path.stat().st_size  # 0: to the end of the file
    assert calls[0][0] == offset
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))  # contiguous, in order
    assert calls[-1][0] + calls[-1][1] == end
    assert all(0 < n <= PIECE for _, n in calls)


def test_request_limit_is_what_the_kernel_serves(tmp_path):
    """One WILLNEED call for twice the limit read from sysfs fetches exactly the limit: neither more (pieces would
    be needlessly small) nor less (the rest of each piece would be dropped)."""
    dev = os.stat(tmp_path).st_dev
    if not os.path.exists(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"):
        pytest.skip("the test directory is not on a block device")
    limit = pagecache.request_limit(dev)
    path = tmp_path / "f.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (3 * limit // (1 << 20) + 1))
    _evicted(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 2 * limit, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 20
    want = limit / path.stat().st_size
    while pagecache.resident_share([path]) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # nothing more arrives later
    assert pagecache.resident_share([path]) * path.stat().st_size == pytest.approx(limit, abs=4096)


def test_request_limit_without_a_disk_is_the_floor():
    assert pagecache.request_limit(os.stat("/proc").st_dev) == pagecache.MIN_PIECE  # no disk behind it


def test_hint_for_a_missing_file_is_dropped(tmp_path):
    pagecache.will_need_file(tmp_path / "gone.h5")  # never raises: the read reports it


def test_a_large_file_is_fetched_whole(tmp_path):
    """On the kernel: a file far larger than any default request limit is in the page cache after one hint (so
    the limit read from sysfs is not above the kernel's). One posix_fadvise call for the whole file fetched 8 MiB
    of it on the machine this was written on."""
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * 48)
    _evicted(path)
    pagecache.will_need_file(path)
    deadline = time.monotonic() + 20
    while pagecache.resident_share([path]) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the reads run in the background
    assert pagecache.resident_share([path]) == 1.0, "48 MiB hinted, not all fetched"
