"""Message bodies on disk: the spool directory beside the database (`storage.spool_dir`).

A body larger than `limits.data_in_memory` is written by the session as DATA arrives, fsynced
(file, then directory) before the row that names it commits, so 250 still means "on disk";
the delivery process signs and sends it from the file in chunks, and the file is unlinked once
the message is finished. Bodies out of the row store leave no space behind in the database
(the emptied queue of the issue-12 benchmark was a 490 MB file plus a 292 MB WAL).

A file named `<qid>.wire` holds the message's wire form: lines as the client sent them,
transparency dots kept (RFC 5321 4.5.2), so delivery sends it as it is read and acceptance never
unstuffs the body; content readers (DKIM, a DSN's returned message) remove the dots as they
read. A file named by the queue id alone (written before wire files) holds content.

Files are named by queue id. A file no row refers to comes from a crash between its write
and its commit (or between a finish and its unlink): `remove_orphans` clears them at start.
Blocking file I/O runs in threads, a chunk per hop, never on the event loop.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable

from .policy import unstuff

CHUNK = 256 * 1024
WIRE_SUFFIX = ".wire"
_IOV_MAX = 1024
_MADE: set[str] = set()  # spool directories known to exist (no mkdir a message)


@dataclass(frozen=True)
class Body:
    """A message as it is sent: `prefix` (the DKIM-Signature field, or nothing), then the
    content, held in memory (`data`, small messages) or in the spool file `path`."""
    prefix: bytes = b""
    data: bytes | None = None
    path: str | None = None
    size: int = 0  # of the content, without the prefix
    ascii: bool | None = None  # known at acceptance for a spooled body; None: look
    wire: bool = False  # the file holds the wire form (transparency dots kept)
    # Where the blocks come from when not from `path`: source(size) -> async iterator of blocks
    # (PostgreSQL's body_chunks rows, read one at a time). Same contract as a file's blocks.
    source: "Callable[[int], AsyncIterator[bytes]] | None" = None

    @classmethod
    def of(cls, data: "bytes | Body") -> "Body":
        return data if isinstance(data, Body) else cls(data=data, size=len(data))

    @property
    def total(self) -> int:
        return len(self.prefix) + self.size

    async def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        """The content (not the prefix) in pieces of about `size` bytes, each ending right after
        a line end (the last one may not): so a piece always starts at the start of a line, and
        a transformation by lines (dot-stuffing, DKIM canonicalization) never sees a line cut
        in two. A body in memory is one piece (it is at most limits.data_in_memory, or ours)."""
        if self.data is not None:
            if self.data:
                yield self.data
            return
        carry = b""
        async for block in self._blocks(size):
            if carry:
                block = carry + block
            cut = block.rfind(b"\n") + 1
            # Never cut inside a line: the carry is at most one line, which DATA holds to
            # 998 octets (spool files hold nothing else).
            carry = block[cut:]
            if cut:
                piece = block[:cut] if carry else block
                yield unstuff(piece) if self.wire else piece  # pieces start at line starts
        if carry:
            yield unstuff(carry) if self.wire else carry

    async def wire_chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        """A wire-form file's bytes as they are stored, in pieces of `size` (cut anywhere)."""
        assert self.wire and (self.path is not None or self.source is not None)
        async for block in self._blocks(size):
            yield block

    async def _blocks(self, size: int) -> AsyncIterator[bytes]:
        if self.source is not None:
            async for block in self.source(size):
                yield block
            return
        # A thread hop a block: the file is opened with the first read and closed with the last
        # (a short read is the end of a regular file), not in hops of their own.
        assert self.path is not None
        path = self.path
        f = None

        def first() -> bytes:
            nonlocal f
            f = open(path, "rb", buffering=0)
            return _read_or_close(f, size)

        try:
            block = await asyncio.to_thread(first)
            while block:
                yield block
                if len(block) < size or f is None or f.closed:
                    return
                block = await asyncio.to_thread(_read_or_close, f, size)
        finally:
            if f is not None and not f.closed:
                await asyncio.to_thread(f.close)

    async def is_ascii(self) -> bool:
        if self.ascii is not None:
            return self.ascii and self.prefix.isascii()
        async for piece in self.chunks():
            if not piece.isascii():
                return False
        return self.prefix.isascii()

    async def read_all(self) -> bytes:
        """prefix + content in one piece: only for what is bounded (a DSN's returned message)."""
        parts = [self.prefix]
        async for piece in self.chunks():
            parts.append(piece)
        return b"".join(parts)


def _read_or_close(f, size: int) -> bytes:
    block = f.read(size)
    if len(block) < size:
        f.close()
    return block


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFile:
    """One body being received: created at the first write, synced by `commit`, removed by
    `discard` unless committed."""

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name
        self.path = os.path.join(directory, name)
        self.size = 0
        self._fd: int | None = None
        self.committed = False

    def _open(self) -> int:
        if self.directory not in _MADE:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            _MADE.add(self.directory)
        # 0600 and O_EXCL: mail is private, and a queue id is never reused.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # the directory went away under us: made again
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            return os.open(self.path, flags, 0o600)

    def _write(self, pieces: list[bytes]) -> None:
        if self._fd is None:
            self._fd = self._open()
        views = [memoryview(p) for p in pieces if p]
        while views:
            n = os.writev(self._fd, views[:_IOV_MAX])
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        self.size += sum(len(p) for p in pieces)

    async def write(self, pieces: list[bytes]) -> None:
        """Append `pieces` (one system call for all of them, in a thread)."""
        await asyncio.to_thread(self._write, pieces)

    def _commit(self, last: list[bytes]) -> None:
        if last:
            self._write(last)
        if self._fd is None:
            self._fd = self._open()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        # The name must be durable too, or a power loss could keep the row and lose the file.
        _fsync_dir(self.directory)

    async def commit(self, last: list[bytes] | None = None) -> None:
        """Append `last` (the end of the message), then sync the file and its name: one hop."""
        await asyncio.to_thread(self._commit, last or [])
        self.committed = True

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def discard(self) -> None:
        await asyncio.to_thread(self._discard)


def unlink_all(paths: Iterable[str]) -> None:
    """Remove finished bodies (blocking: call in a thread). A file already gone is fine."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def remove_orphans(directory: str, referenced: set[str]) -> int:
    """Remove every file in `directory` whose name is not in `referenced` (blocking). Only at
    start, before any session runs: a body being received has no row yet."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if name not in referenced:
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
    return removed
