"""Many relay nodes on one PostgreSQL behind HAProxy, on one machine (issue 17; scale-out.md
section 4): the harness of tests/multinode/.

    Cluster(tmp).start()
      pg        PostgreSQL primary (tests/support/postgres.py), fsync off unless durable=True
      standbys  streaming standbys made with `pg_basebackup -R`, named s1, s2 (application_name),
                synchronous when sync_names is set ('FIRST 1 (s1, s2)')
      proxies   one DBProxy (tests/support/db_proxy.py) per node, node -> proxy -> primary: the
                test cuts one node's database link, or points them all at a promoted standby
      sink      the MX sink (tests/support/mx_sink.py) as the nodes' smarthost
      nodes     3 x `relay serve` (tests/support/relay_instance.py) on 127.0.0.11, .12, .13: a
                PROXY v2 listener on the same port on each address (HAProxy's backends) and a
                direct listener (port 0) for tests that talk to one node
      haproxy   `haproxy -db -f cfg`: one frontend on 127.0.0.1, send-proxy-v2 to the 3 nodes,
                the 220/QUIT/221 check with check-send-proxy
    Cluster.stop(): nodes (SIGTERM, then SIGKILL; SIGCONT first for a frozen one), HAProxy,
    proxies, standbys and the primary, each by PID with a deadline.

Clients connect from LOAD_CLIENT (127.0.0.77), a trusted network for mg.example.com: they relay
without AUTH, and the nodes must see that address through PROXY v2, not HAProxy's.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tests.support.db_proxy import DBProxy
from tests.support.haproxy import Frontend, HAProxy
from tests.support.mx_sink import MXSink
from tests.support.postgres import PostgresServer
from tests.support.relay_instance import RelayInstance

NODE_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
HAPROXY_IP = "127.0.0.1"
LOAD_CLIENT = "127.0.0.77"
DOMAIN = "mg.example.com"
SENDER = f"load@{DOMAIN}"
RCPT = "someone@example.net"
TEST_ID = re.compile(rb"^X-Test-Id: (\S+)\r?$", re.M | re.I)
RECEIVED_ID = re.compile(rb"\(relay\) with \S+ id ([A-Za-z0-9_-]+)")


def free_port_on(addresses: Iterable[str]) -> int:
    """A TCP port free on every one of these addresses (the nodes share one port number)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HAPROXY_IP, 0))
            port = s.getsockname()[1]
        try:
            for a in addresses:
                with socket.socket() as t:
                    t.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every node address")


def children(pid: int) -> list[int]:
    """Direct children of pid (from /proc): a node's delivery process."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(d))
    return out


def sql(dsn: str, query: str, *args: Any, timeout: float = 10) -> list[Any]:
    """One query on a connection of its own (the test thread has no loop of its own)."""
    import asyncpg

    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn, timeout=timeout)
        try:
            return await conn.fetch(query, *args, timeout=timeout)
        finally:
            await conn.close(timeout=timeout)
    return asyncio.run(go())


# --------------------------------------------------------------------------- PostgreSQL


class Primary(PostgresServer):
    """The primary: initdb, then started with replication-friendly settings (fast standby timeouts)."""

    def start(self) -> "Primary":
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", self.USER, "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        self.pg_start()
        return self

    def pg_start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.sock} "
                + ("" if self.durable else "-c fsync=off -c full_page_writes=off ")
                + "-c max_connections=200 -c log_min_messages=warning -c wal_sender_timeout=5s "
                "-c wal_receiver_status_interval=1s")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-w", "-t", "60", "-o", opts,
                  "-l", os.path.join(self.base, "log"), "start", timeout=90)


class Standby(Primary):
    """A streaming standby of `primary`: pg_basebackup -R, its own port, application_name=name."""

    def __init__(self, primary: PostgresServer, name: str):
        super().__init__(primary.bindir, durable=primary.durable)
        self.primary = primary
        self.name = name

    def start(self) -> "Standby":
        self._run(os.path.join(self.bindir, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port),
                  "-U", self.USER, "-D", self.data, "-R", "-X", "stream", "-c", "fast", "--no-sync", timeout=120)
        auto = os.path.join(self.data, "postgresql.auto.conf")
        with open(auto, "a", encoding="utf-8") as f:  # the last setting in the file wins
            f.write(f"primary_conninfo = 'host=127.0.0.1 port={self.primary.port} user={self.USER} "
                    f"application_name={self.name}'\n")
        self.pg_start()
        return self

    def promote(self) -> None:
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-w", "-t", "60", "promote", timeout=90)


def postmaster_pid(server: PostgresServer) -> int | None:
    try:
        with open(os.path.join(server.data, "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def kill_postgres(server: PostgresServer) -> None:
    """SIGKILL the postmaster and every process of its cluster (a crashed database host)."""
    pid = postmaster_pid(server)
    if pid is None:
        return
    victims = [pid, *children(pid)]
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.05)
    # The postmaster was reparented to PID 1, which reaps it when it gets round to it; until
    # then kill(pid, 0) succeeds and a restart refuses the data directory ("lock file
    # postmaster.pid already exists"). Wait for it to be gone; a zombie past the deadline runs
    # nothing, so its lock file may go.
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    if os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(server.data, "postmaster.pid"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- HAProxy


class ClusterHAProxy(HAProxy):
    """One frontend, one backend with a server per node (the support module's HAProxy has one)."""

    def __init__(self, workdir: Path, listen_port: int, backend_port: int, inter: str = "500ms"):
        fronts = [Frontend(f"n{i + 1}", listen_port, backend_port) for i in range(len(NODE_ADDRESSES))]
        super().__init__(workdir, fronts)
        self.listen_port = listen_port
        lines = [
            "global",
            f"    stats socket {self.stats} mode 600 level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client  1m",
            "    timeout server  1m",
            "    retries 2",
            "    option redispatch",
            "frontend fe_submission",
            f"    bind {HAPROXY_IP}:{listen_port}",
            "    default_backend be_submission",
            "backend be_submission",
            "    balance roundrobin",
            f"    source {HAPROXY_IP}",
            "    option tcp-check",
            "    tcp-check expect rstring ^220",
            "    tcp-check send QUIT\\r\\n",
            "    tcp-check expect rstring ^221",
            f"    default-server send-proxy-v2 check-send-proxy check inter {inter} fall 2 rise 1 "
            "on-marked-down shutdown-sessions",
        ]
        lines += [f"    server node{i + 1} {a}:{backend_port}" for i, a in enumerate(NODE_ADDRESSES)]
        self.cfg.write_text("\n".join(lines) + "\n")

    def server_states(self) -> dict[str, str]:
        lines = self.command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("svname") not in ("FRONTEND", "BACKEND", None):
                out[row["svname"]] = row["status"].split()[0] if row["status"] else ""
        return out


# --------------------------------------------------------------------------- nodes


class Node(RelayInstance):
    """One relay node: `relay serve` and its delivery process."""

    name: str
    address: str

    @property
    def delivery_pid(self) -> int | None:
        started = self.events_named("delivery_process_started")
        return started[-1]["pid"] if started else None

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]

    def signal_all(self, sig: int) -> list[int]:
        """Send sig to serve and its delivery process (a whole machine freezing or dying)."""
        pids = self.pids()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        return pids

    def kill(self) -> None:
        pids = self.signal_all(signal.SIGKILL)
        super().kill()
        _wait_gone(pids, 10)

    def stop(self, timeout: float = 15) -> int | None:
        self.signal_all(signal.SIGCONT)  # a frozen node cannot act on SIGTERM
        pids = self.pids()
        rc = super().stop(timeout)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                if _alive(p):
                    os.kill(p, signal.SIGKILL)
        _wait_gone(pids, 10)
        return rc

    @property
    def direct_port(self) -> int:
        return self.ports["starttls"]

    def smtp_direct(self, source: str = LOAD_CLIENT, timeout: float = 15, tls: bool = False) -> smtplib.SMTP:
        s = smtplib.SMTP(self.address, self.direct_port, timeout=timeout, source_address=(source, 0))
        s.ehlo("client.test")
        if tls:
            from tests.support.relay_instance import client_tls_context
            s.starttls(context=client_tls_context())
            s.ehlo("client.test")
        return s


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)


@dataclass
class Cluster:
    tmp: Path
    standbys_wanted: tuple[str, ...] = ()          # ("s1", "s2")
    sync_names: str = ""                           # "FIRST 1 (s1, s2)"
    durable: bool = False
    lease_seconds: int = 3
    commit_timeout: float = 3.0
    node_config: dict = field(default_factory=dict)
    failover_dsn: bool = False                     # nodes list the standbys in their DSN too
    pg: Primary | None = None
    standbys: dict[str, Standby] = field(default_factory=dict)
    proxies: list[DBProxy] = field(default_factory=list)
    sink: MXSink | None = None
    nodes: list[Node] = field(default_factory=list)
    haproxy: ClusterHAProxy | None = None
    database: str = "relay"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Cluster":
        from tests.support.postgres import binaries
        bindir = binaries()
        assert bindir is not None
        try:
            self.pg = Primary(bindir, durable=self.durable).start()
            sql(self.pg.dsn(), f'CREATE DATABASE "{self.database}"')
            for name in self.standbys_wanted:
                self.standbys[name] = Standby(self.pg, name).start()
            if self.sync_names:
                self.wait_streaming(len(self.standbys_wanted))
                self.set_sync_names(self.sync_names)
            self.sink = MXSink().start()
            self.proxies = [DBProxy(self.pg.port).start() for _ in NODE_ADDRESSES]
            port = free_port_on(NODE_ADDRESSES)
            self.nodes = [self._node(i, port) for i in range(len(NODE_ADDRESSES))]
            self.nodes[0].start()  # the first migrates the schema; the others find it done
            self.nodes[0].cli("domain", "add", DOMAIN, check=True)
            for node in self.nodes[1:]:
                node.start()
            self.haproxy = ClusterHAProxy(self.tmp / "haproxy", free_port_on([HAPROXY_IP]), port)
            checked = self.haproxy.check()
            assert checked.returncode == 0, checked.stdout + checked.stderr
            self.haproxy.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, i: int, port: int) -> Node:
        address = NODE_ADDRESSES[i]
        name = f"node{i + 1}"
        behind = {"proxy_protocol": True, "trusted_proxies": [f"{HAPROXY_IP}/32"]}
        base = {
            "server": {"hostname": f"{name}.relay.test", "node_id": name, "shutdown_grace": 2},
            "listeners": [{"address": address, "port": port, "tls": "starttls", **behind},
                          {"address": address, "port": 0, "tls": "starttls"}],
            "storage": {"backend": "postgres", "dsn": self.dsn_via(i), "pool_size": 8,
                        "commit_timeout": self.commit_timeout,
                        "spool_dir": str(self.tmp / name / "spool")},
            "trusted_networks": [{"network": f"{LOAD_CLIENT}/32", "domains": [DOMAIN]}],
            "delivery": {"mode": "smarthost", "lease_seconds": self.lease_seconds, "retry_schedule": [1, 1, 2],
                         "smarthost": {"host": "127.0.0.1", "port": self.sink.port, "tls": "none"}},
            # AUTH failure budgets are shared by the nodes: the credential tests' deliberate
            # failures (from one client, through several nodes) must not add up to a lockout.
            "limits": {"connections_per_ip": 200, "auth_failure_delay": 0.05, "auth_failures": 100,
                       "auth_failures_per_network": 100, "auth_failures_per_user": 100},
        }
        from tests.support.relay_instance import _merge
        node = Node(self.tmp / name, config=_merge(base, self.node_config))
        node.name, node.address = name, address
        return node

    def dsn_via(self, i: int) -> str:
        """Node i's DSN: through its DB proxy; with failover_dsn, the standbys listed after it
        with target_session_attrs=read-write (libpq-style failover, no re-pointing needed)."""
        hosts = [f"127.0.0.1:{self.proxies[i].port}"]
        if not self.failover_dsn:
            return f"postgresql://relay@{hosts[0]}/{self.database}"
        hosts += [f"127.0.0.1:{s.port}" for s in self.standbys.values()]
        return f"postgresql://relay@{','.join(hosts)}/{self.database}?target_session_attrs=read-write"

    @property
    def dsn(self) -> str:
        """Straight to the current primary (the test's own queries)."""
        assert self.pg is not None
        return self.pg.dsn(self.database)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(timeout=10)
        if self.haproxy is not None:
            with contextlib.suppress(Exception):
                self.haproxy.stop()
        for p in self.proxies:
            with contextlib.suppress(Exception):
                p.stop()
        if self.sink is not None:
            with contextlib.suppress(Exception):
                self.sink.stop()
        for s in self.standbys.values():
            with contextlib.suppress(Exception):
                s.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop()
        for server in [*self.standbys.values(), self.pg]:  # a stop that failed leaves a postmaster
            if server is not None:
                kill_postgres(server)

    # ------------------------------------------------------------ replication

    def set_sync_names(self, names: str) -> None:
        quoted = names.replace("'", "''")
        sql(self.pg.dsn(), f"ALTER SYSTEM SET synchronous_standby_names = '{quoted}'")
        sql(self.pg.dsn(), "SELECT pg_reload_conf()")

    def replication(self) -> dict[str, tuple[str, str]]:
        """application_name -> (state, sync_state) from pg_stat_replication on the primary."""
        rows = sql(self.pg.dsn(), "SELECT application_name, state, sync_state FROM pg_stat_replication")
        return {r["application_name"]: (r["state"], r["sync_state"]) for r in rows}

    def wait_streaming(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for st, _ in self.replication().values() if st == "streaming") >= n:
                return
            time.sleep(0.1)
        raise AssertionError(f"{n} standbys not streaming: {self.replication()}")

    # ------------------------------------------------------------ the queue, from the database

    def active(self) -> int:
        return sql(self.dsn, "SELECT count(*) AS n FROM recipients WHERE state IN ('pending', 'deferred')")[0]["n"]

    def leased_by(self, node: Node) -> int:
        return sql(self.dsn, "SELECT count(*) AS n FROM recipients WHERE state IN ('pending', 'deferred') "
                   "AND lease_owner LIKE $1 AND next_attempt_at > extract(epoch FROM now())",
                   node.name + "/%")[0]["n"]

    def wait_drained(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active() == 0:
                return
            time.sleep(0.25)
        rows = sql(self.dsn, "SELECT lease_owner, state, attempts, next_attempt_at - extract(epoch FROM now()) AS due_in, "
                   "last_error FROM recipients WHERE state IN ('pending', 'deferred') LIMIT 5")
        raise AssertionError(f"queue not drained in {timeout}s: {self.active()} recipients active, e.g. "
                             f"{[dict(r) for r in rows]}; recent warnings: {self.warnings()}")

    def warnings(self, per_node: int = 4) -> dict[str, list[str]]:
        """The last few warning/error events of each node (for failure messages)."""
        out = {}
        for n in self.nodes:
            with n._lock:
                bad = [e for e in n.events if e.get("level") in ("warning", "error")]
            out[n.name] = [" ".join(f"{k}={v}" for k, v in e.items() if k not in ("ts", "level"))[:200]
                           for e in bad[-per_node:]]
        return out

    # ------------------------------------------------------------ the sink

    def deliveries(self) -> list[tuple[str, str]]:
        """(X-Test-Id, queue id) of every message the sink took, in arrival order; the queue id
        is the one in the accepting node's Received field."""
        out = []
        assert self.sink is not None
        for m in list(self.sink.messages):
            found, qid = TEST_ID.search(m.data), RECEIVED_ID.search(m.data)
            if found:
                out.append((found.group(1).decode(), qid.group(1).decode() if qid else ""))
        return out

    def audit(self, accepted: dict[str, str]) -> "Audit":
        return Audit.of(accepted, self.deliveries())


@dataclass
class Audit:
    lost: list[str]                 # 250'd, never at the sink
    duplicate_deliveries: int       # the same (test id, qid) at the sink more than once, beyond the first
    duplicate_acceptances: int      # test ids under two qids (committed, then the 250 was lost: RFC 1047)
    delivered: int

    @classmethod
    def of(cls, accepted: dict[str, str], deliveries: list[tuple[str, str]]) -> "Audit":
        seen: dict[tuple[str, str], int] = {}
        for key in deliveries:
            if key[0] in accepted:  # this load's messages only (the sink keeps earlier tests')
                seen[key] = seen.get(key, 0) + 1
        ids = {tid for tid, _ in seen}
        qids_per_id: dict[str, set[str]] = {}
        for tid, qid in seen:
            qids_per_id.setdefault(tid, set()).add(qid)
        return cls(lost=sorted(set(accepted) - ids),
                   duplicate_deliveries=sum(n - 1 for n in seen.values()),
                   duplicate_acceptances=sum(1 for q in qids_per_id.values() if len(q) > 1),
                   delivered=len(ids))


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    accepted: dict[str, str] = field(default_factory=dict)       # test id -> qid of the 250
    codes: dict[int, int] = field(default_factory=dict)          # DATA reply code -> count
    refusals: list[str] = field(default_factory=list)            # non-250 replies and errors, as text
    gave_up: list[str] = field(default_factory=list)             # ids never accepted before the deadline

    def note(self, code: int) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


def message(test_id: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: load {test_id}\r\nX-Test-Id: {test_id}\r\n\r\n"
            f"body of {test_id}\r\n").encode()


class Load:
    """`clients` threads sending `count` messages through HAProxy (5 per connection), each with
    a unique X-Test-Id; a refused or broken one is sent again on a new connection (as a real
    client would) until `deadline` seconds have passed. `progress` counts 250s."""

    def __init__(self, port: int, count: int, *, clients: int = 8, prefix: str = "m", deadline: float = 90,
                 host: str = HAPROXY_IP, source: str = LOAD_CLIENT, per_connection: int = 5):
        self.port, self.host, self.source = port, host, source
        self.ids = [f"{prefix}-{i:05d}" for i in range(count)]
        self.clients, self.deadline, self.per_connection = clients, deadline, per_connection
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._next = 0
        self._retry: list[str] = []
        self._outstanding = 0   # taken by a client, neither accepted nor given back yet
        self._threads: list[threading.Thread] = []
        self._end = 0.0

    @property
    def progress(self) -> int:
        return len(self.result.accepted)

    def start(self) -> "Load":
        self._end = time.monotonic() + self.deadline
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def join(self) -> LoadResult:
        for t in self._threads:
            t.join(max(1.0, self._end - time.monotonic() + 20))
        with self._lock:
            self.result.gave_up = sorted(set(self.ids) - set(self.result.accepted))
        return self.result

    def wait_progress(self, n: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.progress < n:
            time.sleep(0.01)
        return self.progress

    def _take(self) -> str | None:
        with self._lock:
            if self._retry:
                test_id = self._retry.pop(0)
            elif self._next < len(self.ids):
                self._next += 1
                test_id = self.ids[self._next - 1]
            else:
                return None
            self._outstanding += 1
            return test_id

    def _done(self) -> bool:
        """Nothing left to send, and nothing in another client's hands that could come back."""
        with self._lock:
            return not self._retry and self._next >= len(self.ids) and self._outstanding == 0

    def _give_back(self, test_id: str, why: str) -> None:
        with self._lock:
            self._retry.append(test_id)
            self._outstanding -= 1
            self.result.refusals.append(f"{test_id}: {why}")

    def _client(self) -> None:
        while time.monotonic() < self._end:
            test_id = self._take()
            if test_id is None:
                if self._done():
                    return
                time.sleep(0.05)  # another client's message may come back for a retry
                continue
            try:
                s = smtplib.SMTP(self.host, self.port, timeout=10, source_address=(self.source, 0))
            except (OSError, smtplib.SMTPException) as exc:
                self._give_back(test_id, f"connect: {exc}")
                time.sleep(0.1)
                continue
            try:
                s.ehlo("load.test")
                sent = 0
                while test_id is not None:
                    self._send_one(s, test_id)
                    sent += 1
                    test_id = self._take() if sent < self.per_connection else None
            except (OSError, smtplib.SMTPException) as exc:
                if test_id is not None:
                    self._give_back(test_id, f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    s.close()

    def _send_one(self, s: smtplib.SMTP, test_id: str) -> None:
        code, msg = s.mail(SENDER)
        if code != 250:
            raise smtplib.SMTPResponseException(code, msg)
        code, msg = s.rcpt(RCPT)
        if code != 250:
            s.rset()
            raise smtplib.SMTPResponseException(code, msg)
        try:
            code, msg = s.data(message(test_id))
        except smtplib.SMTPDataError as exc:
            code, msg = exc.smtp_code, exc.smtp_error
        with self._lock:
            self.result.note(code)
            if code == 250:
                self.result.accepted[test_id] = msg.decode().rsplit(" ", 1)[-1]
                self._outstanding -= 1
                return
        raise smtplib.SMTPResponseException(code, msg)
