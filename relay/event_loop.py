"""The event loop under every long-running process of the relay (`server.event_loop`).

"uvloop" (the default) is libuv's loop behind asyncio's API: the same sessions, transports and
StreamReaders, with the loop's own work (epoll, callbacks, socket reads and writes) in C. On
the benchmark's authenticated path it took ~15 % of the relay's CPU a message away (README).
"asyncio" is the standard library's loop, for a platform without uvloop or to rule it out.
The CLI's short commands always use asyncio's.
"""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine

CHOICES = ("uvloop", "asyncio")


def run(main: Coroutine[Any, Any, Any], choice: str) -> Any:
    if choice == "uvloop":
        import uvloop
        return uvloop.run(main)
    return asyncio.run(main)
