"""A scripted SMTP receiver on the test's own event loop, for the in-process queue-runner tests.

Where `MXSink` is a well-behaved aiosmtpd server on a thread of its own, this peer is a plain
asyncio server that misbehaves on cue, one phase at a time: it stalls at RCPT, reads the body
at a set rate or not at all, answers the final dot late, closes mid-DATA, or greets with a
given name. It counts what matters for exactly-once delivery: connections (and the most open
at once), and messages whose final dot actually arrived (`completed`). A message counts only
when the whole ".\r\n" came in: a reset connection must leave nothing behind.

Its receive buffer is small (SO_RCVBUF) so that a slow or stopped reader pushes back on the
sender at once, instead of the kernel absorbing megabytes on loopback.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

RCVBUF = 16 * 1024


@dataclass
class Script:
    greeting: str = "220 peer.test ESMTP scripted"
    ehlo_name: str = "peer.test"
    dsn: bool = False
    rcpt_stall: bool = False          # never answer RCPT
    mail_reply: str = "250 2.1.0 OK"
    read_rate: float | None = None    # bytes per second while reading the body; None = at once
    pause_body: float = 0.0           # read nothing of the body for this long first
    close_mid_data: int | None = None  # close after this many body bytes
    dot_delay: float = 0.0            # wait this long before answering the final dot
    dot_reply: str = "250 2.0.0 OK queued"


@dataclass
class Received:
    sender: str
    rcpts: list[str]
    body: bytes
    connection: int


@dataclass
class PeerStats:
    connections: int = 0
    active: int = 0
    max_active: int = 0
    completed: list[Received] = field(default_factory=list)
    resets: int = 0
    commands: list[str] = field(default_factory=list)


class ScriptedPeer:
    def __init__(self, script: Script | None = None, host: str = "127.0.0.1", port: int = 0):
        self.script = script or Script()
        self.host = host
        self.port = port  # 0: any free port; a given one lets peers on several addresses share it
        self.stats = PeerStats()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "ScriptedPeer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # inherited by accepted sockets
        sock.bind((self.host, self.port))
        self._server = await asyncio.start_server(self._client, sock=sock, limit=RCVBUF)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        st = self.stats
        st.connections += 1
        serial = st.connections
        st.active += 1
        st.max_active = max(st.max_active, st.active)
        try:
            await self._dialog(reader, writer, serial)
        except (ConnectionError, asyncio.IncompleteReadError):
            st.resets += 1
        except asyncio.CancelledError:
            pass
        finally:
            st.active -= 1
            writer.transport.abort()
            self._tasks.discard(task)

    async def _dialog(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: int) -> None:
        sc = self.script

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await say(sc.greeting)
        sender, rcpts = "", []
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper().decode("ascii", "replace")
            self.stats.commands.append(verb)
            if verb in ("EHLO", "HELO"):
                ext = ["SIZE 100000000", "8BITMIME"] + (["DSN"] if sc.dsn else [])
                await say("\r\n".join([f"250-{sc.ehlo_name}"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"]))
            elif verb == "MAIL":
                sender, rcpts = line[10:].decode().strip().split(">")[0].lstrip("<"), []
                await say(sc.mail_reply)
            elif verb == "RCPT":
                if sc.rcpt_stall:
                    # Never answers; reads on only to notice when the sender gives up and goes.
                    while await reader.read(4096):
                        pass
                    return
                rcpts.append(line[8:].decode().strip().split(">")[0].lstrip("<"))
                await say("250 2.1.5 OK")
            elif verb == "DATA":
                await say("354 go ahead")
                body = await self._read_body(reader)
                if body is None:
                    return
                if sc.dot_delay:
                    await asyncio.sleep(sc.dot_delay)
                self.stats.completed.append(Received(sender, rcpts, body, serial))
                await say(sc.dot_reply)
            elif verb == "RSET":
                sender, rcpts = "", []
                await say("250 2.0.0 OK")
            elif verb == "QUIT":
                await say("221 2.0.0 bye")
                return
            else:
                await say("502 5.5.1 not implemented")

    async def _read_body(self, reader: asyncio.StreamReader) -> bytes | None:
        sc = self.script
        if sc.pause_body:
            await asyncio.sleep(sc.pause_body)
        buf = bytearray()
        while not buf.endswith(b"\r\n.\r\n") and buf != b".\r\n":
            if sc.read_rate:
                chunk = await reader.read(max(1, int(sc.read_rate / 20)))
                await asyncio.sleep(0.05)
            else:
                chunk = await reader.read(65536)
            if not chunk:
                return None  # the sender went away: no message
            buf += chunk
            if sc.close_mid_data is not None and len(buf) >= sc.close_mid_data:
                return None
        return bytes(buf)
