"""Giving memory back to the system after a burst of large messages.

A large message passes through buffers of up to a MiB (reads from the client, spool writes,
reads from the spool file for sending). glibc's malloc keeps freed blocks in its heaps (one
arena per thread, and its mmap threshold grows to the largest block freed), so after 50 x 10 MB
messages at once both processes stayed 70-90 MB above where they started, minutes later.
`malloc_trim(0)` hands free pages of every arena back. It runs in a thread (ctypes releases the
GIL), at most every `interval` seconds, and only after `threshold` bytes of large-message traffic
since the last one: small mail never triggers it. Where the C library has no malloc_trim (musl,
macOS) this does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Callable

_trim: Callable[[int], int] | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
except (OSError, AttributeError):
    _trim = None


class Trimmer:
    """Counts large-message bytes handled; `run` returns freed memory once enough went by."""

    def __init__(self, threshold: int = 16 * 1024 * 1024, interval: float = 2.0):
        self.threshold = threshold
        self.interval = interval
        self._since = 0
        self.trims = 0

    @property
    def available(self) -> bool:
        return _trim is not None

    def note(self, nbytes: int) -> None:
        self._since += nbytes

    async def trim_if_due(self, busy: bool = False) -> bool:
        if _trim is None or busy or self._since < self.threshold:
            return False
        self._since = 0
        self.trims += 1
        await asyncio.to_thread(_trim, 0)
        return True

    async def run(self, busy: Callable[[], bool] = lambda: False) -> None:
        """Every `interval` seconds: trim if enough large traffic went by and the process is not
        in the middle of large work (`busy`). Cancel to stop."""
        while True:
            await asyncio.sleep(self.interval)
            await self.trim_if_due(busy())


# One per process: the session notes what it received, the delivery side what it sent.
TRIMMER = Trimmer()
