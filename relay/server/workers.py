"""Acceptance over several processes (issue 16): the parent accepts, its workers speak SMTP.

One event loop did every TLS handshake, AUTH and DATA of the node, so a DATA's 250 waited behind
other clients' handshakes while a core sat idle. With `server.acceptance_workers` > 1, `relay
serve` keeps its listeners and accepts as before, applies the caps at accept (it is the one
place that sees every connection, so `limits.connections` and `connections_per_ip` stay exact),
and hands each admitted socket to the least busy worker over a Unix socket (SCM_RIGHTS), as
Postfix's master hands connections to its smtpd processes. The worker runs the session (TLS,
AUTH, DATA, the commit) on its own loop and stores, and says when the connection ends.

The AUTH budgets stay exact the same way: each worker's AuthThrottle asks the parent's
`LocalBudgets` (server/auth.py) at each step, as nodes ask PostgreSQL's tables (on PostgreSQL
the workers ask the database directly, which already counts every node and worker).

Channel: AF_UNIX SOCK_SEQPACKET, one per worker, one message a packet:

    parent -> worker   C[conn_id, listener, implicit, client, local]  + the socket (SCM_RIGHTS)
                       a[req_id, result]             the answer to an AUTH budget step
    worker -> parent   R<storage identity>           ready (stores open, signal handlers set)
                       K<conn_id>,<conn_id>,...      these hand-overs arrived (a worker that does
                                                     not say so within STALLED gets no more)
                       X<conn_id>,<conn_id>,...      these connections ended
                       W                             a message was committed: wake delivery
                       A[req_id, op, args...]        an AUTH budget step (begin/failure/success/release)

A second socket per worker carries the metrics scrape (delivery_process.MetricsLink), from the
metrics thread. A worker that dies is restarted; the connections it held are released and its
AUTH reservations given back (their guesses were never answered), so neither leaks a slot.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

from .. import replies
from ..delivery_process import MetricsLink
from ..logs import event
from .auth import LocalBudgets
from .listeners import _plain
from .session import ServerState

log = logging.getLogger("relay.workers")

READY_TIMEOUT = 60.0
RESTART_DELAY = 1.0
STALLED = 1.0  # seconds a hand-over may wait for the worker's acknowledgement
MAX_PACKET = 65536


def worker_count(configured: int) -> int:
    """server.acceptance_workers: 0 is one per core; 1 is acceptance in the parent itself."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


class Outbox:
    """Packets to a non-blocking SEQPACKET socket, in order: what the kernel buffer cannot take
    now waits for it to drain (a release or an AUTH answer is never dropped)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._queue: list[bytes] = []

    def send(self, packet: bytes) -> None:
        if not self._queue:
            try:
                self.sock.send(packet)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self.sock.fileno(), self._flush)
            except OSError:
                return  # the other side is gone: its supervisor or EOF handling takes over
        self._queue.append(packet)

    def _flush(self) -> None:
        while self._queue:
            try:
                self.sock.send(self._queue[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._queue.clear()
                break
            del self._queue[0]
        self._loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self._queue:
            self._loop.remove_writer(self.sock.fileno())
            self._queue.clear()


class _Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.chan: socket.socket | None = None
        self.out: Outbox | None = None
        self.metrics = MetricsLink()
        self.conns: dict[int, str] = {}   # conn_id -> client address, while the worker holds it
        # Handed over, not yet acknowledged (conn_id -> when): a worker that leaves one
        # unacknowledged past STALLED (stopped, stuck in a loop) gets no more connections.
        self.unacked: dict[int, float] = {}
        self.ready = False
        self.reload_due = False


class AcceptanceWorkers:
    """The parent's side: spawn and supervise the workers, admit and hand over connections,
    count them until released, answer the workers' AUTH budget steps."""

    def __init__(self, count: int, config_path: str | None, state: ServerState, storage_path: str,
                 budgets: LocalBudgets | None, wake: Callable[[], None]):
        self.count = count
        self.config_path = config_path
        self.state = state
        self.storage_path = storage_path
        self.budgets = budgets       # None on PostgreSQL: the workers use the shared tables
        self._wake = wake
        self.workers = [_Worker(i) for i in range(count)]
        self._next_id = 0
        self._stopping = False
        self._supervisors: list[asyncio.Task] = []

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        try:
            await asyncio.gather(*(self._spawn(w) for w in self.workers))
        except BaseException:
            await self.stop(timeout=0)
            raise
        self._supervisors = [asyncio.create_task(self._supervise(w), name=f"acceptance-worker-{w.index}")
                             for w in self.workers]

    async def _spawn(self, w: _Worker) -> None:
        parent_chan, child_chan = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # systemd hears the parent only
        args = [sys.executable, "-m", "relay.acceptance_process", "--chan-fd", str(child_chan.fileno()),
                "--ctl-fd", str(child_ctl.fileno()), "--parent-pid", str(os.getpid()),
                "--index", str(w.index), "--workers", str(self.count)]
        if self.config_path:
            args += ["--config", self.config_path]
        try:
            proc = await asyncio.create_subprocess_exec(*args, pass_fds=(child_chan.fileno(), child_ctl.fileno()),
                                                        env=env, stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            for s in (parent_chan, parent_ctl):
                s.close()
            raise
        finally:
            child_chan.close()
            child_ctl.close()
        w.proc = proc
        parent_chan.setblocking(False)
        try:
            hello = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(parent_chan, 4096), READY_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            hello = b""
        except asyncio.CancelledError:
            parent_chan.close()
            parent_ctl.close()
            raise
        problem = None
        if not hello.startswith(b"R"):
            problem = f"acceptance worker {w.index} did not start"
        elif os.fsdecode(hello[1:]) != self.storage_path:
            problem = (f"acceptance worker {w.index} opened {os.fsdecode(hello[1:])}, not {self.storage_path} "
                       "(storage.path or storage.dsn changed in the config file without a restart?)")
        if problem is not None:
            parent_chan.close()
            parent_ctl.close()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"{problem} (exit code {proc.returncode}); details in the lines above")
        w.chan = parent_chan
        w.out = Outbox(parent_chan)
        w.metrics.attach(parent_ctl)
        w.ready = True
        if w.reload_due:  # a SIGHUP came while it started: its config may predate the file
            w.reload_due = False
            proc.send_signal(signal.SIGHUP)
        asyncio.get_running_loop().add_reader(parent_chan.fileno(), self._on_packet, w)
        event(log, "acceptance_worker_started", worker=w.index, pid=proc.pid)

    async def _supervise(self, w: _Worker) -> None:
        delay = RESTART_DELAY
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            released = self._forget(w)
            if self._stopping:
                return
            event(log, "acceptance_worker_exited", logging.ERROR, worker=w.index, pid=w.proc.pid, code=code,
                  connections_lost=released or None, action=f"restarting in {delay:g}s")
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn(w)
                delay = RESTART_DELAY
            except Exception as exc:  # noqa: BLE001 - the other workers go on meanwhile
                event(log, "acceptance_worker_restart_failed", logging.ERROR, worker=w.index,
                      error=f"{type(exc).__name__}: {exc}")
                delay = min(delay * 2, 30.0)

    def _forget(self, w: _Worker) -> int:
        """The worker is gone: its channel closes, its connections and AUTH reservations end."""
        w.ready = False
        if w.chan is not None:
            try:
                asyncio.get_running_loop().remove_reader(w.chan.fileno())
            except (ValueError, OSError):
                pass
            if w.out is not None:
                w.out.close()
            w.chan.close()
            w.chan, w.out = None, None
        w.metrics.attach(None)
        released = len(w.conns)
        for conn_id in list(w.conns):
            self._release(w, conn_id)
        if self.budgets is not None:
            self.budgets.release_owner(w)
        return released

    def signal(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is None or w.proc.returncode is not None:
                continue
            if sig == signal.SIGHUP and not w.ready:
                # Still starting (SIGHUP's default action would kill it): reload once ready.
                w.reload_due = True
                continue
            w.proc.send_signal(sig)

    async def begin_stop(self) -> None:
        """Shutdown starts: no restarts, no new connections; every worker drains its sessions
        within the grace period (they get 421 at their next command past it)."""
        self._stopping = True
        for t in self._supervisors:
            t.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self._supervisors = []
        self.signal(signal.SIGTERM)

    async def stop(self, timeout: float) -> None:
        await self.begin_stop()

        async def one(w: _Worker) -> None:
            if w.proc is None:
                return
            if w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), timeout + 5)
                except asyncio.TimeoutError:
                    event(log, "acceptance_worker_killed", logging.ERROR, worker=w.index, pid=w.proc.pid)
                    w.proc.kill()
                    await w.proc.wait()
            self._forget(w)
        await asyncio.gather(*(one(w) for w in self.workers))

    def metrics_texts(self) -> list[str]:
        """Every worker's exposition (called from the metrics thread)."""
        return [t for w in self.workers for t in (w.metrics.text(), w.metrics.retired_text())]

    @property
    def held(self) -> int:
        return sum(len(w.conns) for w in self.workers)

    # ------------------------------------------------------------ connections

    def handoff(self, conn: socket.socket, listener: str, implicit: bool, client: str | None,
                local: bool = False) -> None:
        """An accepted socket (a PROXY listener's: with the client its header named): refuse it
        at the caps, or hand it to the worker holding the fewest connections."""
        st = self.state
        ip = client
        if ip is None:
            try:
                ip = _plain(str(conn.getpeername()[0]))
            except (OSError, ValueError):
                conn.close()
                return
        refused = st.admission(ip)
        if refused is None:
            now = time.monotonic()
            live = [w for w in self.workers
                    if w.ready and (not w.unacked or now - next(iter(w.unacked.values())) < STALLED)]
            for w in sorted(live, key=lambda w: len(w.conns)):
                self._next_id += 1
                conn_id = self._next_id
                packet = b"C" + json.dumps([conn_id, listener, implicit, client, local]).encode()
                try:
                    socket.send_fds(w.chan, [packet], [conn.fileno()])
                except OSError:  # its buffer is full (a stalled worker) or it just died: the next one
                    continue
                w.conns[conn_id] = ip
                w.unacked[conn_id] = now
                st.elsewhere += 1
                st.ip_joined(ip)
                conn.close()  # the worker holds its own descriptor now
                return
            refused = ("no_worker", replies.NO_WORKER)
        reason, reply = refused
        st.note_refusal(ip, listener, reason, reply)
        if not implicit:  # a TLS client would read a plain-text reply as a protocol error
            try:
                conn.send(f"{reply}\r\n".encode())
            except OSError:
                pass
        conn.close()

    def _release(self, w: _Worker, conn_id: int) -> None:
        w.unacked.pop(conn_id, None)
        ip = w.conns.pop(conn_id, None)
        if ip is None:
            return  # already released (a worker's late report after its restart, say)
        self.state.elsewhere -= 1
        self.state.ip_left(ip)

    # ------------------------------------------------------------ the channel

    def _on_packet(self, w: _Worker) -> None:
        for _ in range(64):  # others' turns come between batches
            chan = w.chan
            if chan is None:
                return
            try:
                packet = chan.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:  # the worker is gone: its supervisor releases what it held
                asyncio.get_running_loop().remove_reader(chan.fileno())
                return
            kind, body = packet[:1], packet[1:]
            if kind == b"K":
                for part in body.split(b","):
                    w.unacked.pop(int(part), None)
            elif kind == b"X":
                for part in body.split(b","):
                    self._release(w, int(part))
            elif kind == b"W":
                self._wake()
            elif kind == b"A":
                self._auth_step(w, body)

    def _auth_step(self, w: _Worker, body: bytes) -> None:
        req_id, op, *args = json.loads(body)
        b = self.budgets
        result: object = None
        if b is not None:
            if op == "begin":
                got = b.begin(args[0], args[1], owner=w)
                result = [got.refusal, got.waiting, got.attempt]
            elif op == "failure":
                result = b.failure(args[0], args[1], args[2])
            elif op == "success":
                b.success(args[0], args[1], args[2])
            elif op == "release":
                b.release(args[0])
        if w.out is not None:
            w.out.send(b"a" + json.dumps([req_id, result]).encode())
