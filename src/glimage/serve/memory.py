"""Giving freed memory back to the system after large requests.

Decoded source images and large activations are freed by Python, but glibc's malloc keeps freed heap pages
(its mmap threshold grows with every large free, so later large blocks come from the heap): a server's RSS
then only ever grows. malloc_trim(0) returns every free page; it costs milliseconds, so the server calls it
after requests that held large buffers and whenever it goes idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = None


def trim() -> bool:
    """Return free heap memory to the system (glibc); False where there is no malloc_trim (macOS, musl)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
