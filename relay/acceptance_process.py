"""An acceptance worker (issue 16): SMTP sessions on connections the parent accepted.

Started by `relay serve` when `server.acceptance_workers` > 1 (server/workers.py has the whole
picture and the channel's messages). The worker opens its own stores (its commits are its own
group commits, synchronous like the parent's: its 250 promises the disk too), reads the
certificate itself, and runs each handed-over socket as a Session. The parent applied the
connection caps; the per-process limits that guard this process's CPU and memory
(`tls_handshakes`, `auth_pending`, `max_data_in_flight`) are the configured ones divided by the
number of workers, so the node as a whole stays within them.

SIGTERM: drain (sessions get the grace period, then 421), close the stores, exit. SIGHUP:
re-read the config and certificate, as the parent does. If the parent dies, so does the worker.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import config as config_mod, event_loop, memory, tls
from .config import Config, LimitsConfig
from .delivery_process import answer_metrics, child_start, early_hup
from .logs import event
from .store.contract import StoreUnavailable
from .store.shared_auth import Begin, Budgets

log = logging.getLogger("relay.workers")

AUTH_STEP_TIMEOUT = 5.0  # the parent answers in microseconds; past this, fail closed (454)


def worker_limits(limits: LimitsConfig, workers: int, index: int) -> LimitsConfig:
    """Worker `index`'s share of the limits that bound one process's CPU and memory: the
    configured value split among the workers so the shares add up to it (the first ones take
    the remainder), but never below 1 each (a limit smaller than the worker count is exceeded
    by that much rather than leaving a worker unable to do any TLS or AUTH at all)."""
    def share(n: int) -> int:
        base, extra = divmod(n, workers)
        return max(1, base + (1 if index < extra else 0))
    return dataclasses.replace(limits, tls_handshakes=share(limits.tls_handshakes),
                               auth_pending=share(limits.auth_pending),
                               max_data_in_flight=share(limits.max_data_in_flight))


class ParentBudgets:
    """SharedAuthBudgets asked of the parent's LocalBudgets over the channel (one node, several
    workers). No answer within AUTH_STEP_TIMEOUT is StoreUnavailable: AUTH fails closed."""

    def __init__(self, worker: "_Worker"):
        self._worker = worker
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}

    async def _ask(self, op: str, *args: object) -> object:
        if self._worker.closed:
            raise StoreUnavailable("the relay's parent process is gone")
        req_id = next(self._ids)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting[req_id] = fut
        self._worker.send(b"A" + json.dumps([req_id, op, *args]).encode())
        # A timer, not wait_for: no task per step on the AUTH path.
        timer = loop.call_later(AUTH_STEP_TIMEOUT, self._timed_out, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiting.pop(req_id, None)

    @staticmethod
    def _timed_out(fut: asyncio.Future) -> None:
        if not fut.done():
            fut.set_exception(StoreUnavailable("the relay's parent process did not answer an AUTH budget step"))

    def answered(self, req_id: int, result: object) -> None:
        fut = self._waiting.get(req_id)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def parent_gone(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(StoreUnavailable("the relay's parent process is gone"))

    async def begin(self, net: str, user: str, b: Budgets) -> Begin:
        refusal, waiting, attempt = await self._ask("begin", net, user)  # type: ignore[misc]
        return Begin(refusal, waiting, attempt)

    async def failure(self, attempt: int | None, net: str, user: str, b: Budgets) -> list[str]:
        return list(await self._ask("failure", attempt, net, user))  # type: ignore[call-overload]

    async def success(self, attempt: int | None, net: str, user: str) -> None:
        await self._ask("success", attempt, net, user)

    async def release(self, attempt: int) -> None:
        await self._ask("release", attempt)


class _Worker:
    def __init__(self, cfg: Config, config_path: str | None, chan_fd: int, ctl_fd: int, index: int, workers: int):
        self.cfg = cfg
        self.config_path = config_path
        self.chan = socket.socket(fileno=chan_fd)
        self.ctl = socket.socket(fileno=ctl_fd)
        self.index = index
        self.workers = workers
        self.stop_event = asyncio.Event()
        self.closed = False
        self._released: list[int] = []
        self._arrived: list[int] = []
        self._wake_due = False
        self._flush_due = False
        self.budgets = ParentBudgets(self)
        self._tasks: set[asyncio.Task] = set()

    def settings(self, cfg: Config):
        from .daemon import settings_from
        s = settings_from(cfg)
        return dataclasses.replace(s, limits=worker_limits(s.limits, self.workers, self.index))

    async def run(self) -> int:
        from .server.auth import AuthThrottle
        from .server.session import ServerState
        from .server.workers import Outbox
        from .store.factory import open_stores, storage_identity
        from .store.shared_state import shared_state

        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="relay-cpu")
        loop.set_default_executor(executor)
        self.out = Outbox(self.chan)
        stores = await open_stores(self.cfg, role="serve", executor=executor, on_enqueue=self._enqueued)
        shared = shared_state(stores)
        settings = self.settings(self.cfg)
        # On PostgreSQL the tables count every node and worker; on SQLite the parent does.
        budgets = shared.auth_budgets if shared.auth_budgets is not None else self.budgets
        self.state = ServerState(settings=settings, credentials=stores.credentials, queue=stores.queue,
                                 spool_dir=self.cfg.storage.resolved_spool_dir(),
                                 tls_context=tls.server_context(self.cfg.tls.cert, self.cfg.tls.key),
                                 throttle=AuthThrottle(settings.limits, shared=budgets),
                                 domain_verified=stores.dkim.is_verified,
                                 admitted_upstream=True, on_release=self._release)
        self.stores = stores
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        if early_hup():
            self._reload()
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides when we stop
        self.chan.setblocking(False)
        self.chan.send(b"R" + os.fsencode(storage_identity(self.cfg)))  # see AcceptanceWorkers._spawn
        loop.add_reader(self.chan.fileno(), self._on_packet)
        self.ctl.setblocking(False)
        loop.add_reader(self.ctl.fileno(), self._on_ctl)
        trim_task = asyncio.create_task(memory.TRIMMER.run(lambda: self.state.data_in_flight > 0), name="malloc-trim")
        await self.stop_event.wait()
        await self.state.drain(time.monotonic() + self.cfg.server.shutdown_grace)
        loop.remove_reader(self.ctl.fileno())
        trim_task.cancel()
        await asyncio.gather(trim_task, return_exceptions=True)
        await self.state.throttle.settled()
        await shared.close()
        await stores.close()
        self._flush()
        executor.shutdown(wait=False)
        return 0

    # ------------------------------------------------------------ to the parent

    def send(self, packet: bytes) -> None:
        self.out.send(packet)

    def _release(self, conn_id: int) -> None:
        self._released.append(conn_id)
        self._schedule_flush()

    def _enqueued(self) -> None:
        self._wake_due = True
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # One packet per loop pass for all the releases and wakes of that pass.
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self._arrived:
            ids, self._arrived = self._arrived, []
            self.send(b"K" + b",".join(str(i).encode() for i in ids))
        if self._released:
            ids, self._released = self._released, []
            self.send(b"X" + b",".join(str(i).encode() for i in ids))
        if self._wake_due:
            self._wake_due = False
            self.send(b"W")

    # ------------------------------------------------------------ from the parent

    def _on_packet(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                packet, fds, _flags, _addr = socket.recv_fds(self.chan, 65536, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet, fds = b"", []
            if not packet and not fds:  # the parent is gone: stop (it was SIGKILLed, say)
                loop.remove_reader(self.chan.fileno())
                self.closed = True
                self.budgets.parent_gone()
                self.stop_event.set()
                return
            kind, body = packet[:1], packet[1:]
            if kind == b"C" and fds:
                for extra in fds[1:]:
                    os.close(extra)
                self._accept(fds[0], body)
            else:
                for fd in fds:
                    os.close(fd)
                if kind == b"a":
                    req_id, result = json.loads(body)
                    self.budgets.answered(req_id, result)

    def _accept(self, fd: int, body: bytes) -> None:
        from .server.session import Session
        conn_id, listener, implicit, client, local = json.loads(body)
        self._arrived.append(conn_id)  # acknowledged at the end of this loop pass
        self._schedule_flush()
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        state = self.state

        def factory() -> Session:
            return Session(state, listener, implicit, client_ip=client, proxy_local=local, conn_id=conn_id)

        async def connect() -> None:
            try:
                await asyncio.get_running_loop().connect_accepted_socket(factory, sock)
            except OSError:
                sock.close()  # reset before connection_made: give the slot back at once
                self._release(conn_id)
        task = asyncio.get_running_loop().create_task(connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_ctl(self) -> None:
        if not answer_metrics(self.ctl):
            asyncio.get_running_loop().remove_reader(self.ctl.fileno())

    def _reload(self) -> None:
        """SIGHUP, forwarded by the parent once its own reload succeeded."""
        try:
            new = config_mod.load(self.config_path)
            context = tls.server_context(new.tls.cert, new.tls.key)
        except (config_mod.ConfigError, tls.TLSError) as exc:
            event(log, "reload_failed", logging.ERROR, worker=self.index, error=str(exc))
            return
        self.state.tls_context = context
        self.state.settings = self.settings(new)
        self.state.throttle.configure(self.state.settings.limits)
        self.stores.credentials.configure(new.credentials)
        self.cfg = new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="relay-acceptance", description="relay's acceptance worker (started by `relay serve`)")
    p.add_argument("--chan-fd", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    started = child_start(p, argv, "acceptance worker")
    if isinstance(started, int):
        return started
    args, cfg = started
    import asyncio.sslproto
    asyncio.sslproto.SSLProtocol.max_size = 32 * 1024  # as daemon.serve: 32 KiB a TLS session, not 256
    try:
        return event_loop.run(_Worker(cfg, args.config, args.chan_fd, args.ctl_fd, args.index, args.workers).run(),
                              cfg.server.event_loop)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
