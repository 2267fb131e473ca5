"""Delivery in a process of its own, so acceptance and delivery each get a core.

The daemon (the parent) keeps everything that is per connection or per client address:
listeners, sessions, limits, AUTH throttling. This child runs only the queue runner over the
same SQLite queue (WAL: one writer at a time, readers never wait). Nothing but the database
is shared; two small channels join the processes:

- the wake pipe, parent -> child: one byte after each committed enqueue, so delivery starts at
  once instead of at the next poll. End of file means the parent is gone: the child stops.
- the control socket, both ways: the parent's metrics endpoint asks for the child's metrics
  (b"M"), the child answers with a length-prefixed exposition, merged into one scrape.

The parent restarts a child that dies, after handing its leases back (`QueueStore.recover`:
no other runner exists at that moment), and stops it last on shutdown so in-flight
deliveries finish within the grace period.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import struct
import sys
import threading
from typing import Awaitable, Callable

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import config as config_mod, db, event_loop, memory, metrics
from .config import Config
from .logs import event

log = logging.getLogger("relay.delivery")

_LEN = struct.Struct("!I")
_MAX_REPLY = 1 << 20  # the exposition is ~15 KB; a SEQPACKET message must be read whole


# ---------------------------------------------------------------- parent side

class DeliveryProcess:
    """The parent's handle on the delivery child: start, wake, metrics, restart, stop."""

    RESTART_DELAY = 1.0

    def __init__(self, config_path: str | None, storage_path: str, on_exit: Callable[[], Awaitable[None]],
                 own_listeners: list[tuple[str, int]] = ()):
        self.config_path = config_path
        self.own_listeners = list(own_listeners)  # the parent's bound listeners: an MX there is a loop
        # The child reads the config file itself: a restart after the file was edited (without a
        # reload) must not leave it delivering from another database than the one we fill.
        self.storage_path = storage_path  # factory.storage_identity: the file's real path or the DSN
        self._metrics = MetricsLink()
        self._on_exit = on_exit  # run before a restart (lease recovery)
        self.proc: asyncio.subprocess.Process | None = None
        self._wake_w: int | None = None
        self._stopping = False
        self._ready = False
        self._reload_due = False
        self._supervisor: asyncio.Task | None = None

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="delivery-supervisor")

    async def _spawn(self) -> None:
        self._ready = False
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        # SEQPACKET keeps message boundaries: a reply that arrives after its scrape timed out is
        # recognised by its sequence number and dropped, never read as part of the next one.
        parent_ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # systemd hears the parent only
        args = [sys.executable, "-m", "relay.delivery_process", "--wake-fd", str(wake_r),
                "--ctl-fd", str(child_ctl.fileno()), "--parent-pid", str(os.getpid())]
        if self.config_path:
            args += ["--config", self.config_path]
        for address, port in self.own_listeners:
            args += ["--own-listener", f"[{address}]:{port}"]
        try:
            self.proc = await asyncio.create_subprocess_exec(*args, pass_fds=(wake_r, child_ctl.fileno()), env=env,
                                                             stdin=asyncio.subprocess.DEVNULL)
        finally:
            os.close(wake_r)
            child_ctl.close()
        # Ready means ready: wait for the child to have its queue open and its signal handlers
        # set (a SIGTERM before that would kill it outright). It names the database it opened.
        parent_ctl.setblocking(False)
        try:
            hello = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(parent_ctl, 4096), 60)
        except (OSError, asyncio.TimeoutError):
            hello = b""
        except asyncio.CancelledError:
            parent_ctl.close()
            os.close(wake_w)
            raise
        problem = None
        if not hello.startswith(b"R"):
            problem = "the delivery process did not start"
        elif os.fsdecode(hello[1:]) != self.storage_path:
            problem = (f"the delivery process opened {os.fsdecode(hello[1:])}, not {self.storage_path} "
                       "(storage.path or storage.dsn changed in the config file without a restart?)")
        if problem is not None:
            parent_ctl.close()
            os.close(wake_w)
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            raise RuntimeError(f"{problem} (exit code {self.proc.returncode}); details in the lines above")
        old_w, self._wake_w = self._wake_w, wake_w
        self._metrics.attach(parent_ctl)
        self._ready = True
        if self._reload_due:  # a SIGHUP came while it started: its config may predate the file
            self._reload_due = False
            self.proc.send_signal(signal.SIGHUP)
        if old_w is not None:
            os.close(old_w)
        event(log, "delivery_process_started", pid=self.proc.pid)

    async def _supervise(self) -> None:
        delay = self.RESTART_DELAY
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            event(log, "delivery_process_exited", logging.ERROR, pid=self.proc.pid, code=code,
                  action=f"restarting in {delay:g}s")
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._on_exit()
                await self._spawn()
                delay = self.RESTART_DELAY
            except Exception as exc:  # noqa: BLE001 - keep trying: the queue waits on disk meanwhile
                event(log, "delivery_process_restart_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                delay = min(delay * 2, 30.0)  # a broken config file: do not spin

    def wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, BrokenPipeError, OSError):
            pass  # full: a wake is already pending; broken: the supervisor restarts the child

    def signal(self, sig: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        if sig == signal.SIGHUP and not self._ready:
            self._reload_due = True  # still starting: SIGHUP's default action would kill it
            return
        self.proc.send_signal(sig)

    def metrics_texts(self) -> list[str]:
        """This child's exposition and its predecessors' counters (called from the metrics thread)."""
        return [self._metrics.text(), self._metrics.retired_text()]

    async def begin_stop(self) -> None:
        """Shutdown starts: no more restarts, and the child starts its own drain (in-flight
        deliveries finish within its grace period) while the sessions drain here."""
        self._stopping = True
        if self._supervisor is not None:  # also ends a restart in progress (its child is signalled below)
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        self.signal(signal.SIGTERM)

    async def stop(self, timeout: float) -> None:
        await self.begin_stop()
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout + 5)
            except asyncio.TimeoutError:
                event(log, "delivery_process_killed", logging.ERROR, pid=self.proc.pid)
                self.proc.kill()
                await self.proc.wait()
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None
        self._metrics.attach(None)


class MetricsLink:
    """The parent's end of a child's control socket, used from the metrics thread: ask for the
    child's exposition (b"M" + a sequence number), read the reply with the same number."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._last = ""
        self._retired: dict[str, tuple[str, dict[tuple, float]]] = {}

    def attach(self, sock: socket.socket | None) -> None:
        """A (re)started child's socket, or None when it stops; the previous one is closed.
        The previous child's counters are kept (`retired`): its successor starts from zero,
        and a sum that went down would read as a counter reset to Prometheus."""
        if sock is not None:
            sock.setblocking(True)
            sock.settimeout(5)  # the metrics thread's requests
        with self._lock:
            old, self._sock = self._sock, sock
            if self._last:
                self._retire(self._last)
                self._last = ""
        if old is not None:
            old.close()

    def _retire(self, text: str) -> None:
        for fam in text_string_to_metric_families(text):
            if fam.type not in ("counter", "histogram", "summary"):
                continue  # gauges (sessions open, bytes in flight) end with the process
            kept = self._retired.setdefault(fam.name, (fam.type, {}))[1]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                kept[key] = kept.get(key, 0.0) + s.value

    def retired_text(self) -> str:
        """The counters of the children this link served before, in the exposition format."""
        lines = []
        with self._lock:
            for name, (kind, kept) in self._retired.items():
                # prometheus_client writes a counter's TYPE line under its _total name.
                lines.append(f"# TYPE {name}_total {kind}" if kind == "counter" else f"# TYPE {name} {kind}")
                for (sample, labels), value in kept.items():
                    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{sample}{{{inner}}} {value!r}" if inner else f"{sample} {value!r}")
        return "\n".join(lines) + "\n" if lines else ""

    def text(self) -> str:
        """The child's exposition. If it does not answer, the last one it gave: counters that
        dip for one scrape would read as resets."""
        with self._lock:
            text = self._fetch()
            if text:
                self._last = text
            return self._last

    def _fetch(self) -> str:
        sock = self._sock
        if sock is None:
            return ""
        self._seq = (self._seq + 1) % 2**32
        tag = _LEN.pack(self._seq)
        try:
            sock.send(b"M" + tag)
            while True:
                reply = sock.recv(_MAX_REPLY)
                if not reply:
                    return ""
                if reply[:_LEN.size] == tag:
                    return reply[_LEN.size:].decode()
        except OSError:  # timed out (5 s) or the child is gone
            return ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def answer_metrics(sock: socket.socket) -> bool:
    """The child's side of MetricsLink, from a loop reader on its control socket. False when the
    parent closed its end (then stop reading it)."""
    try:
        request = sock.recv(64)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        request = b""
    if not request:
        return False
    if request[:1] == b"M":  # metrics, tagged with the request's sequence number
        try:
            sock.send(request[1:1 + _LEN.size] + generate_latest(metrics.REGISTRY))
        except OSError:
            pass  # buffer full or parent gone: that scrape times out, the next one works
    return True


class MergedRegistry:
    """What the metrics endpoint serves: this process's metrics plus its children's (the
    delivery process, the acceptance workers), summed.

    Each series is moved by one kind of process only, or by several that each count their own
    share (acceptance workers: their sessions, messages, AUTH results), so a sum is exact for
    counters, gauges and histograms alike (metrics.py turns `_created` series off).
    """

    PARENT_ONLY = frozenset({"relay_build_info"})  # set in the parent; the child's copy is empty

    def __init__(self, registry, remotes: Callable[[], list[str]]):
        self._registry = registry
        self._remotes = remotes

    def collect(self):
        local = text_string_to_metric_families(generate_latest(self._registry).decode())
        remote: dict[str, list] = {}
        for text in self._remotes():
            if text:
                for f in text_string_to_metric_families(text):
                    remote.setdefault(f.name, []).extend(f.samples)
        for fam in local:
            others = [] if fam.name in self.PARENT_ONLY or fam.type == "info" else remote.get(fam.name, [])
            values: dict[tuple, float] = {}
            order: list[tuple] = []
            proto: dict[tuple, object] = {}
            for s in list(fam.samples) + others:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in values:
                    order.append(key)
                    proto[key] = s
                    values[key] = 0.0
                values[key] += s.value
            fam.samples = [proto[k]._replace(value=values[k]) for k in order]
            yield fam

    def restricted_registry(self, names):  # prometheus_client's `?name[]=` filter: serve everything
        return self


# ---------------------------------------------------------------- child side

class _Child:
    def __init__(self, cfg: Config, config_path: str | None, wake_fd: int, ctl_fd: int,
                 own_listeners: list[tuple[str, int]] = ()):
        self.cfg = cfg
        self.own_listeners = list(own_listeners)
        self.config_path = config_path
        self.wake_fd = wake_fd
        self.ctl = socket.socket(fileno=ctl_fd)
        self.stop_event = asyncio.Event()
        self.exit_code = 0

    async def run(self) -> int:
        from .delivery import Router
        from .queue_runner import QueueRunner
        from .signing import Signer
        from .store.factory import open_stores, storage_identity

        loop = asyncio.get_running_loop()
        runner: QueueRunner | None = None
        stores = await open_stores(self.cfg, role="delivery",
                                   on_enqueue=lambda: runner.wake() if runner else None)  # our own bounces
        queue = stores.queue
        router = Router(self.cfg, tls_state=stores.tls_state)
        router.set_own_listeners(self.own_listeners)
        from .store.shared_state import shared_state
        shared = shared_state(stores)  # slots and singleton jobs shared by the nodes (issue 17)
        runner = QueueRunner(queue, router, self.cfg, signer=Signer(stores.dkim), slots=shared.slots)
        self.runner = runner
        os.set_blocking(self.wake_fd, False)
        loop.add_reader(self.wake_fd, self._on_wake)
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        if early_hup():
            self._reload()
        # Ctrl-C in a terminal reaches the whole process group: the parent decides when we stop.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        self.ctl.send(b"R" + os.fsencode(storage_identity(self.cfg)))  # see DeliveryProcess._spawn
        self.ctl.setblocking(False)
        loop.add_reader(self.ctl.fileno(), self._on_ctl)
        reporter_task = None
        if self.cfg.delivery.tlsrpt_from and stores.tls_state is not None:
            from .tls_reports import TLSReporter
            reporter = TLSReporter(self.cfg, stores.tls_state, queue, router.resolver, router.verified_tls,
                                   singleton=shared.job_locks)
            reporter_task = asyncio.create_task(reporter.run(), name="tlsrpt")
        run_task = asyncio.create_task(runner.run(), name="queue-runner")
        run_task.add_done_callback(self._runner_ended)
        trim_task = asyncio.create_task(memory.TRIMMER.run(), name="malloc-trim")  # after large sends
        event(log, "delivery_ready", pid=os.getpid())
        await self.stop_event.wait()
        loop.remove_reader(self.wake_fd)
        if reporter_task is not None:
            reporter_task.cancel()
            await asyncio.gather(reporter_task, return_exceptions=True)
        await runner.stop(timeout=self.cfg.server.shutdown_grace)
        loop.remove_reader(self.ctl.fileno())
        run_task.cancel()
        trim_task.cancel()
        await asyncio.gather(run_task, trim_task, return_exceptions=True)
        await stores.close()
        event(log, "delivery_stopped", pid=os.getpid())
        return self.exit_code

    def _runner_ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or self.stop_event.is_set():
            return
        # A bug ended the runner: exit, so the parent recovers the leases and starts a fresh one.
        event(log, "queue_runner_crashed", logging.ERROR, error=repr(task.exception()))
        self.exit_code = 1
        self.stop_event.set()

    def _on_wake(self) -> None:
        try:
            data = os.read(self.wake_fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the parent is gone (even SIGKILLed): stop, leases go back by recovery
            self.stop_event.set()
            return
        self.runner.wake()

    def _reload(self) -> None:
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            event(log, "reload_failed", logging.ERROR, error=str(exc))
            return
        self.runner.configure(new)
        self.cfg = new

    def _on_ctl(self) -> None:
        if not answer_metrics(self.ctl):  # the parent closed its end
            asyncio.get_running_loop().remove_reader(self.ctl.fileno())


def _die_with_parent(parent_pid: int) -> None:
    """If `relay serve` dies (even by SIGKILL), die with it, as one process would have: otherwise
    a restarted relay recovers the leases of deliveries this orphan is still making."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the wake pipe's end of file still stops us
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(0)


_EARLY_HUP: list[int] = []


def early_hup() -> bool:
    """A SIGHUP came before the child's loop had its handler (its config may be older than the
    file): the child reloads once its handler is set."""
    return bool(_EARLY_HUP)


def child_start(p: argparse.ArgumentParser, argv: list[str] | None, what: str):
    """A child process's start (delivery, acceptance workers): the common arguments, dying with
    the parent, the config (a bad one: one line, exit 2) and logging. (args, cfg) or an exit code."""
    # First of all: SIGHUP's default action is to exit, and the parent forwards a reload to a
    # child still opening its stores (a worker restarting, say).
    signal.signal(signal.SIGHUP, lambda *_: _EARLY_HUP.append(1))
    p.add_argument("--config")
    p.add_argument("--ctl-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    from . import logs
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"relay {what}: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.logging.format, cfg.logging.level)
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="relay-delivery", description="relay's delivery process (started by `relay serve`)")
    p.add_argument("--wake-fd", type=int, required=True)
    p.add_argument("--own-listener", action="append", default=[], help="[address]:port the parent listens on")
    started = child_start(p, argv, "delivery")
    if isinstance(started, int):
        return started
    args, cfg = started
    try:
        own = [(a.partition("]:")[0].lstrip("["), int(a.rpartition(":")[2])) for a in args.own_listener]
        return event_loop.run(_Child(cfg, args.config, args.wake_fd, args.ctl_fd, own).run(), cfg.server.event_loop)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
