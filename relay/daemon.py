"""Composition root: builds everything from Config and runs it on one event loop.

Listeners, the queue runner and the metrics exporter share the loop; SIGHUP reloads the
config-derived limits and the certificate; SIGTERM drains sessions, releases delivery leases
and exits 0. systemd hears READY=1 once every listener is bound and the queue is open.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, config as config_mod, db, event_loop, memory, metrics, tls
from .config import Config, ConfigError
from .delivery_process import DeliveryProcess, MergedRegistry
from .logs import event
from .store import singleton
from .store.factory import open_stores, storage_identity
from .store.shared_state import shared_state
from .server import listeners, refusal
from .server.auth import AuthThrottle, LocalBudgets
from .server.session import ServerState, Settings
from .server.workers import AcceptanceWorkers, worker_count

if TYPE_CHECKING:
    from .queue_runner import QueueRunner

log = logging.getLogger("relay.daemon")
# How often finished messages past storage.finished_retention are deleted.
PURGE_INTERVAL = 30.0
PURGE_BATCH, PURGE_PAUSE = 200, 0.05


def sd_notify(message: str) -> None:
    """systemd's notify protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError:
        pass


def settings_from(cfg: Config) -> Settings:
    return Settings(
        hostname=cfg.server.hostname, limits=cfg.limits,
        trusted=tuple((ipaddress.ip_network(t.network, strict=False), tuple(t.domains)) for t in cfg.trusted_networks),
        unverified_domains_refused=cfg.domains.require_verified, from_header=cfg.policy.from_header,
        own_names=frozenset(n.lower() for n in (cfg.server.hostname, cfg.helo_hostname)
                            if "." in n and n.lower() != "localhost"))


def raise_fd_limit() -> None:
    """Each session is a descriptor: lift the soft limit to the hard one (systemd sets LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def ensure_certificate(cfg: Config) -> None:
    if not Path(cfg.tls.cert).exists() and not Path(cfg.tls.key).exists():
        tls.write_self_signed(cfg.tls.cert, cfg.tls.key, cfg.server.hostname)
        event(log, "self_signed_certificate", logging.WARNING, cert=cfg.tls.cert, hostname=cfg.server.hostname,
              hint="clients will warn about it: install a real certificate (e.g. certbot) at tls.cert/tls.key "
                   "and send SIGHUP (systemctl reload relay)")


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None, found_by: str = "-c"):
        self.cfg = cfg
        self.config_path = config_path
        self.found_by = found_by
        self.stop_event = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="relay-cpu")
        self.bound: list[listeners.Bound] = []
        self.refusal_servers: list[listeners.Acceptor] = []
        self.metrics_server = None
        self.admin = None
        self.workers: AcceptanceWorkers | None = None

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        loop.set_default_executor(self.executor)
        config_mod.check_files(cfg)  # before any log line: a refusal here is the one line printed
        # Said at every start: which file, found how, and which database it leads to.
        event(log, "starting", config=str(Path(self.config_path or "").absolute()), found_by=self.found_by,
              database=storage_identity(cfg))
        for line in config_mod.dns_warnings(cfg):
            event(log, "config_warning", logging.WARNING, warning=line)
        ensure_certificate(cfg)
        tls_context = tls.server_context(cfg.tls.cert, cfg.tls.key)
        self.tls_context = tls_context
        metrics.TLS_CERT_EXPIRY.set(tls.not_after(cfg.tls.cert))
        raise_fd_limit()
        self.stores = None
        self.queue = None
        self.runner: QueueRunner | None = None
        self.delivery: DeliveryProcess | None = None
        try:
            self.stores = await open_stores(cfg, role="serve", executor=self.executor, on_enqueue=self._wake_delivery)
            self.credentials = self.stores.credentials
            self.dkim = self.stores.dkim
            self.queue = self.stores.queue
            self.shared = shared_state(self.stores)  # AUTH budgets, slots, singleton jobs (issue 17)
            await self._recover()
            # Before any session: a spool file without a row is from a crash (written, never
            # committed; or finished, not yet unlinked). Only `relay serve` writes spool files.
            orphans = await self.queue.remove_orphan_files()
            if orphans:
                event(log, "spool_orphans_removed", files=orphans)
            if not cfg.delivery.separate_process:
                # Imported here only: with a delivery process, this one never loads dnspython,
                # aiosmtplib or dkimpy (~25 MB of RSS).
                from .delivery import Router
                from .queue_runner import QueueRunner
                from .signing import Signer
                self.runner = QueueRunner(self.queue, Router(cfg, tls_state=self.stores.tls_state), cfg, signer=Signer(self.dkim, self.executor),
                                          slots=self.shared.slots)
            self.state = ServerState(settings=settings_from(cfg), credentials=self.credentials, queue=self.queue,
                                     spool_dir=cfg.storage.resolved_spool_dir(),
                                     tls_context=tls_context,
                                     throttle=AuthThrottle(cfg.limits, shared=self.shared.auth_budgets),
                                     domain_verified=self.dkim.is_verified)
            n = worker_count(cfg.server.acceptance_workers)
            if n > 1:
                # Sessions in worker processes (server/workers.py); this one accepts and counts.
                # On SQLite the parent's throttle is every worker's shared AUTH budget.
                budgets = LocalBudgets(self.state.throttle) if self.shared.auth_budgets is None else None
                self.workers = AcceptanceWorkers(n, self.config_path, self.state, storage_identity(cfg), budgets,
                                                 wake=self._wake_delivery)
                await self.workers.start()
            self.bound = await listeners.start(self.state, cfg.listeners, workers=self.workers)
            self.refusal_servers = await refusal.start(cfg.refusal, self.state)
            # Delivery starts once the listeners are bound: it must know their real addresses
            # and ports (port 0 included) to recognise an MX that is this relay (a mail loop).
            own = [(b.address, b.port) for b in self.bound]
            if self.runner is not None:
                self.runner.router.set_own_listeners(own)
            else:
                self.delivery = DeliveryProcess(self.config_path, storage_identity(cfg), on_exit=self._recover,
                                                own_listeners=own)
                await self.delivery.start()
            self._start_metrics()
            if cfg.admin.listen:
                await self._start_admin()
        except BaseException:
            if self.admin is not None:
                await self.admin.stop()
            if self.delivery is not None:
                await self.delivery.stop(timeout=0)
            if self.workers is not None:
                await self.workers.stop(timeout=0)
            for b in self.bound:
                b.server.close()
            for srv in self.refusal_servers:
                srv.close()
            await self._close_stores()
            raise
        # The node in the one info metric: dashboards join on it for a per-node row
        # (`... * on(instance) group_left(node) relay_build_info`).
        metrics.BUILD_INFO.info({"version": __version__, "node": self.queue.owner.node})
        for sig, handler in ((signal.SIGHUP, self.reload), (signal.SIGTERM, self.stop_event.set),
                             (signal.SIGINT, self.stop_event.set)):
            loop.add_signal_handler(sig, handler)
        runner_task = asyncio.create_task(self.runner.run(), name="queue-runner") if self.runner else None
        gauges_task = asyncio.create_task(self._queue_gauges(), name="queue-gauges")
        purge_task = asyncio.create_task(self._purge_finished(), name="queue-purge")
        # Freed memory back to the system after large DATA, once no DATA is being received.
        trim_task = asyncio.create_task(memory.TRIMMER.run(lambda: self.state.data_in_flight > 0), name="malloc-trim")
        heartbeat_task = asyncio.create_task(self._heartbeat(), name="node-heartbeat")
        event(log, "ready", version=__version__, hostname=cfg.server.hostname, pid=os.getpid(),
              event_loop=type(loop).__module__.partition(".")[0], acceptance_workers=len(self.workers.workers)
              if self.workers is not None else None,
              listeners=",".join(f"{b.address}:{b.port}/{b.tls}" for b in self.bound))
        sd_notify("READY=1")
        await self.stop_event.wait()
        sd_notify("STOPPING=1")
        event(log, "stopping", grace=cfg.server.shutdown_grace)
        await self._shutdown(runner_task, gauges_task, purge_task, trim_task, heartbeat_task)
        event(log, "stopped")
        return 0

    async def _heartbeat(self) -> None:
        """This node in `nodes` every HEARTBEAT seconds, for `relay node list`. A failed beat is
        one warning line when it starts failing and one when it works again, not one a beat."""
        from .store.nodes import HEARTBEAT
        assert self.stores is not None and self.stores.nodes is not None
        owner, started, failing = self.queue.owner, time.time(), False
        while True:
            try:
                await self.stores.nodes.beat(owner.node, owner.incarnation, socket.gethostname(), os.getpid(),
                                             __version__, started, time.time())
                if failing:
                    event(log, "heartbeat_restored", node=owner.node)
                failing = False
            except Exception as exc:  # noqa: BLE001 - a beat lost is a node shown silent, nothing more
                if not failing:
                    event(log, "heartbeat_failed", logging.WARNING, node=owner.node, error=str(exc))
                failing = True
            await asyncio.sleep(HEARTBEAT)

    async def _say_stopped(self) -> None:
        if self.stores is None or self.stores.nodes is None:
            return
        try:
            await asyncio.wait_for(self.stores.nodes.stopped(self.queue.owner.node, self.queue.owner.incarnation,
                                                             time.time()), 5)
        except Exception:  # noqa: BLE001 - then the list shows it silent, which is also true
            log.debug("could not record the stop", exc_info=True)

    def _wake_delivery(self) -> None:
        if self.runner is not None:
            self.runner.wake()
        elif self.delivery is not None:
            self.delivery.wake()

    async def _recover(self) -> None:
        """No runner of this node holds a lease now (startup, or the delivery process died): this
        node's leases are due again; other nodes' are theirs (see QueueStore.recover)."""
        recovered = await self.queue.recover()
        if recovered:
            event(log, "queue_recovered", recipients=recovered)

    async def _start_admin(self) -> None:
        # Imported only when on: aiohttp and Jinja2 are not loaded by a relay without the admin.
        from .admin import server as admin_server
        from .api import make_api_app
        from .operations import Operations
        ops = Operations(self.stores, self.cfg)
        # The HTTP API shares the admin's listener, under /api/v1/ with its own bearer auth.
        api_app = make_api_app(ops)
        self.admin = await admin_server.start(self.cfg, self.stores, self.executor, self.tls_context,
                                              [(b.port, b.tls) for b in self.bound], ops=ops, api_app=api_app)

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server
        host, port = config_mod.parse_hostport(self.cfg.metrics.listen, 9469)
        try:
            # Its own thread: scrapes never wait on the SMTP event loop, nor it on them.
            registry = metrics.REGISTRY if self.delivery is None and self.workers is None \
                else MergedRegistry(metrics.REGISTRY, self._children_metrics)
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise listeners.bind_error("metrics endpoint", host, port, exc) from None
        self.metrics_server = server
        event(log, "listening", address=host, port=server.server_port, tls="none", metrics="/metrics")

    def _children_metrics(self) -> list[str]:
        """The delivery process's and the acceptance workers' expositions (the metrics thread)."""
        texts = self.delivery.metrics_texts() if self.delivery is not None else []
        return texts + (self.workers.metrics_texts() if self.workers is not None else [])

    async def _queue_gauges(self) -> None:
        while True:
            try:
                s = await self.queue.stats()
                for state, n in s["recipients"].items():
                    metrics.QUEUE_RECIPIENTS.labels(state).set(n)
                metrics.QUEUE_MESSAGES.set(s["messages"])
                metrics.QUEUE_OLDEST.set(time.time() - s["oldest"] if s["oldest"] else 0)
            except Exception:  # noqa: BLE001 - a gauge refresh must never take the daemon down
                log.debug("queue gauge refresh failed", exc_info=True)
            await asyncio.sleep(5)

    async def _purge_finished(self) -> None:
        """Finished messages stay for `relay queue history` for storage.finished_retention, then go
        (on one node per PURGE_INTERVAL: store/singleton.py)."""
        await singleton.every(self.shared.job_locks, "queue-purge", PURGE_INTERVAL, self._purge_once)

    async def _purge_once(self) -> None:
        before = time.time() - self.cfg.storage.finished_retention
        # Small batches with a pause between: this shares the writer (and the writer
        # lock) with acceptance, and 200 deletions hold it ~5-25 ms (1000: ~70 ms).
        while await self.queue.purge_finished(before, limit=PURGE_BATCH) > 0:
            await asyncio.sleep(PURGE_PAUSE)

    def reload(self) -> None:
        """SIGHUP: re-read config; apply limits and certificate; keep sessions and listeners.

        All or nothing: the new config and a fresh TLS context are built first, and only when
        both load is anything swapped in. Otherwise the running config and certificate pair
        keep serving, and one line says so."""
        try:
            new = config_mod.load(self.config_path)
            config_mod.check_files(new)
            context = tls.server_context(new.tls.cert, new.tls.key)
            expiry = tls.not_after(new.tls.cert)
        except (ConfigError, tls.TLSError) as exc:
            metrics.RELOADS.labels("failed").inc()
            event(log, "reload_failed", logging.ERROR, error=str(exc),
                  kept=f"previous configuration and certificate {self.cfg.tls.cert}")
            return
        # Sessions and refusal listeners read state.tls_context at each handshake.
        self.state.tls_context = self.tls_context = context
        metrics.TLS_CERT_EXPIRY.set(expiry)
        metrics.RELOADS.labels("ok").inc()
        self.state.settings = settings_from(new)
        self.state.throttle.configure(new.limits)
        self.credentials.configure(new.credentials)
        if self.admin is not None:
            self.admin.configure(new)  # timeouts and login limits; admin.listen needs a restart
            self.admin.set_tls_context(context)
        if self.runner is not None:
            self.runner.configure(new)
        if self.delivery is not None:
            self.delivery.signal(signal.SIGHUP)
        if self.workers is not None:
            self.workers.signal(signal.SIGHUP)  # each re-reads the file and certificate itself
        self.cfg = new
        event(log, "reloaded", cert=new.tls.cert)

    async def _shutdown(self, runner_task: asyncio.Task | None, gauges_task: asyncio.Task,
                        purge_task: asyncio.Task, trim_task: asyncio.Task, heartbeat_task: asyncio.Task) -> None:
        for b in self.bound:
            b.server.close()
        for s in self.refusal_servers:
            s.close()
        if self.admin is not None:
            # First: no admin change starts while the queue drains (requests get 2 s to finish).
            await self.admin.stop()
            self.admin = None
        self.state.draining = True
        deadline = time.monotonic() + self.cfg.server.shutdown_grace
        if self.delivery is not None:
            # In parallel with the sessions: in-flight deliveries get the whole grace period too.
            await self.delivery.begin_stop()
        if self.workers is not None:
            await self.workers.begin_stop()  # their sessions drain in parallel, same grace
        await self.state.drain(deadline)
        if self.workers is not None:
            await self.workers.stop(timeout=max(1.0, deadline + 1 - time.monotonic()))
        # One grace period in all: what the sessions used is not given to the runner again.
        remaining = max(1.0, deadline + 1 - time.monotonic())
        if self.runner is not None:
            await self.runner.stop(timeout=remaining)
        if self.delivery is not None:
            await self.delivery.stop(timeout=remaining)
        tasks = [t for t in (runner_task, gauges_task, purge_task, trim_task, heartbeat_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._say_stopped()
        await self.state.throttle.settled()  # shared AUTH writes in flight
        await self.shared.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        await self._close_stores()
        self.executor.shutdown(wait=False)

    async def _close_stores(self) -> None:
        if self.stores is not None:
            await self.stores.close()


def serve(cfg: Config, config_path: str | None, found_by: str = "-c") -> int:
    # asyncio gives every TLS connection a zero-filled 256 KiB read buffer (SSLProtocol.max_size):
    # ~280 KB of RSS per idle TLS session. TLS records carry at most 16 KiB: 32 KiB is plenty.
    import asyncio.sslproto
    asyncio.sslproto.SSLProtocol.max_size = 32 * 1024
    return event_loop.run(Daemon(cfg, config_path, found_by).run(), cfg.server.event_loop)
