"""Faults around the real relay process: crashes, a full disk, a locked store, broken peers, SIGTERM.

The promise under test is the one in docs/architecture.md: 250 means committed, and what is
committed is delivered (RFC 5321 6.1: at least once; a duplicate only for a delivery that was in
flight when the relay died). Clients here keep exact books: every message carries a unique
Subject, and each attempt ends as one of
  acked    - the client read 250 to the final dot;
  refused  - the client read another reply to the final dot (never delivered);
  unknown  - the final dot was sent and the connection died before a reply (may be delivered:
             committed-but-unacknowledged is allowed, and proven separately with a crash point);
  unsent   - the attempt failed before the final dot (never delivered).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import wait_until
from tests.support.mx_sink import MXSink, make_test_tls_context, shared_cert_files, SlowSink

SENDER_DOMAIN = USER.rpartition("@")[2]
SUBJECT = re.compile(rb"^Subject: (.*?)\r$", re.M)


# ---------------------------------------------------------------- helpers


def subject_of(data: bytes) -> str | None:
    m = SUBJECT.search(data)
    return m.group(1).decode() if m else None


def delivered_subjects(sink) -> Counter:
    return Counter(subject_of(m.data) for m in list(sink.messages) if m.mail_from not in ("", "<>"))


def bounces(sink) -> list:
    return [m for m in list(sink.messages) if m.mail_from in ("", "<>")]


def qid_of(data: bytes) -> str | None:
    m = re.search(rb"\(relay\) with [A-Z]+ id ([0-9A-Za-z]+)", data)
    return m.group(1).decode() if m else None


def no_traceback(relay) -> None:
    tb = [i for i, line in enumerate(relay.raw_log) if "Traceback" in line]
    assert not tb, "relay logged a traceback:\n" + "\n".join(relay.raw_log[max(0, tb[0] - 5):tb[0] + 30])


def point_dns(dns_server, mx_host: str = "mx.example.net", address: str = "127.0.0.1") -> None:
    dns_server.set(mx_host, "A", [address])
    dns_server.set("example.net", "MX", [f"10 {mx_host}."])
    dns_server.set(SENDER_DOMAIN, "MX", [f"10 {mx_host}."])  # bounces come back to the sink


def start(make_relay, dns_server, sink_port: int, *, name="relay", env=None, config=None, **delivery):
    cfg = {"delivery": delivery, **(config or {})}
    relay = make_relay(start=False, name=name, dns=dns_server.address, mx_port=sink_port, config=cfg, env=env)
    relay.add_user(USER, PASSWORD)
    return relay.start()


def message(subject: str, size: int = 0) -> bytes:
    body = b"".join(b"x" * 76 + b"\r\n" for _ in range(size // 78))
    return (f"From: {USER}\r\nTo: bob@example.net\r\nSubject: {subject}\r\nMessage-ID: <{subject}@hostile.test>\r\n"
            f"\r\n").encode() + body + b"body\r\n"


class Client:
    """One authenticated connection that sends messages one transaction at a time, keeping books."""

    def __init__(self, relay, *, implicit: bool = True, timeout: float = 15, source: str | None = None):
        self.s = relay.smtp(implicit=implicit, timeout=timeout, source=source)
        code, msg = self.s.login(USER, PASSWORD)
        assert code == 235, msg

    def send(self, subject: str, size: int = 0, rcpt: str = "bob@example.net") -> tuple[str, str]:
        """-> (outcome, detail): outcome in acked/refused/unknown/unsent; detail the qid or the reply."""
        s = self.s
        dot_sent = False
        try:
            code, msg = s.mail(USER)
            if code != 250:
                return "unsent", f"{code} {msg!r}"
            code, msg = s.rcpt(rcpt)
            if code != 250:
                return "unsent", f"{code} {msg!r}"
            code, msg = s.docmd("DATA")
            if code != 354:
                return "unsent", f"{code} {msg!r}"
            s.send(message(subject, size) + b".\r\n")
            dot_sent = True
            code, msg = s.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            return ("unknown" if dot_sent else "unsent"), repr(exc)
        text = msg.decode(errors="replace")
        if code == 250:
            return "acked", text.rsplit(" ", 1)[-1]
        return "refused", f"{code} {text}"

    def close(self) -> None:
        try:
            self.s.quit()
        except (smtplib.SMTPException, OSError):
            try:
                self.s.close()
            except OSError:
                pass


# ---------------------------------------------------------------- SIGKILL under load

@pytest.mark.slow
def test_sigkill_under_load_delivers_every_acknowledged_message(make_relay, dns_server):
    seed = int(os.environ.get("HOSTILE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed={seed} (HOSTILE_SEED to replay)")
    clients, per_client, kills = 4, 12, 3
    with SlowSink(data_delay=0.05) as sink:
        point_dns(dns_server)
        relay = start(make_relay, dns_server, sink.port, max_connections_per_destination=2)
        books: dict[str, tuple[str, str]] = {}   # subject -> (outcome, detail)
        lock = threading.Lock()
        stop_at = time.monotonic() + 90

        def client(n: int) -> None:
            acked, attempt, c = 0, 0, None
            while acked < per_client and time.monotonic() < stop_at:
                if c is None:
                    try:
                        c = Client(relay, timeout=10)
                    except Exception:  # noqa: BLE001 - relay down or restarting (ports unknown): retry
                        time.sleep(0.05)
                        continue
                subject = f"load-{n}-{attempt}"
                attempt += 1
                outcome, detail = c.send(subject)
                with lock:
                    books[subject] = (outcome, detail)
                if outcome == "acked":
                    acked += 1
                elif outcome in ("unknown", "unsent"):
                    c.close()
                    c = None
            if c is not None:
                c.close()

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
        for t in threads:
            t.start()

        def acked_count() -> int:
            with lock:
                return sum(1 for o, _ in books.values() if o == "acked")

        leased_at_kill: list[set[str]] = []
        total = clients * per_client
        for k in range(kills):
            # A random point in the k-th slice of the run, by messages acknowledged so far.
            threshold = rng.randint(total * k // (kills + 1) + 1, total * (k + 1) // (kills + 1))
            wait_until(lambda: acked_count() >= threshold, timeout=60, what=f"{threshold} acked before kill {k}")
            relay.kill()  # SIGKILL: no cleanup at all
            with contextlib.closing(relay.db()) as conn:
                leased_at_kill.append({r["msg_id"] for r in conn.execute(
                    "SELECT DISTINCT msg_id FROM recipients WHERE lease_token IS NOT NULL")})
            relay.start()
        for t in threads:
            t.join(timeout=max(1, stop_at - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "clients did not finish in time"

        acked = {s for s, (o, _) in books.items() if o == "acked"}
        assert len(acked) == total, f"only {len(acked)} of {total} acknowledged"
        wait_until(lambda: set(delivered_subjects(sink)) >= acked, timeout=60, what="every acked message delivered")
        wait_until(lambda: not relay.queued(), timeout=30, what="an empty queue")  # nothing more will go out
        counts = delivered_subjects(sink)
        qid_by_subject = {subject_of(m.data): qid_of(m.data) for m in sink.messages}
        outcomes = Counter(o for o, _ in books.values())
        print(f"outcomes={dict(outcomes)} deliveries={sum(counts.values())} "
              f"duplicates={sum(n - 1 for n in counts.values() if n > 1)} leased_at_kills={[len(x) for x in leased_at_kill]}")
        for subject, (outcome, detail) in books.items():
            n = counts.get(subject, 0)
            leased = sum(1 for s in leased_at_kill if qid_by_subject.get(subject) in s)
            if outcome == "acked":
                assert n >= 1, f"acknowledged {subject} ({detail}) was never delivered"
                assert qid_by_subject[subject] == detail, "delivered under another queue id than acknowledged"
            if outcome in ("refused", "unsent"):
                assert n == 0, f"{subject} was delivered {n}x though the client never got 250 ({outcome}: {detail})"
            # A second copy only for a delivery in flight at a kill: one extra per such kill.
            assert n <= 1 + leased, f"{subject} delivered {n}x, in flight at {leased} kill(s)"
        assert set(counts) <= set(books), set(counts) - set(books)
        assert not bounces(sink)
        no_traceback(relay)


# ---------------------------------------------------------------- crash between commit and 250

def test_crash_after_commit_before_250_still_delivers(make_relay, dns_server):
    with MXSink() as sink:
        point_dns(dns_server)
        relay = start(make_relay, dns_server, sink.port, env={"RELAY_CRASH_POINT": "after_commit"})
        c = Client(relay)
        outcome, detail = c.send("committed-not-acked")
        assert outcome == "unknown", (outcome, detail)  # no 250 ever reached the client
        assert relay.proc.wait(10) == 75               # the crash hook, right after the COMMIT
        with contextlib.closing(relay.db()) as conn:
            [row] = conn.execute("SELECT m.id, b.data FROM messages m JOIN bodies b ON b.id = m.id").fetchall()
        assert subject_of(row["data"]) == "committed-not-acked"
        assert not sink.messages
        relay.env.pop("RELAY_CRASH_POINT")
        relay.start()
        assert sink.wait_for(1, timeout=15)
        wait_until(lambda: not relay.queued(), what="an empty queue")
        assert [subject_of(m.data) for m in sink.messages] == ["committed-not-acked"]
        assert relay.events_named("delivery", qid=row["id"], result="delivered")
        no_traceback(relay)


# ---------------------------------------------------------------- disk full, store locked

def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a size-limited tmpfs")
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {cp.stderr.strip()}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def _relay_on_tmpfs(make_relay, tmp_path: Path, size: str):
    """A relay (delivery held back) whose files live on a tmpfs of `size`; unmounted afterwards."""
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, size)
    relay = None
    try:
        relay = make_relay(start=False, name="fs/relay", config=_hold_queue(_closed_port()))
        relay.add_user(USER, PASSWORD)
        relay.start()
        yield relay, fs
    finally:
        if relay is not None:
            relay.kill()
        _umount(fs)


def _hold_queue(port: int) -> dict:
    return {"delivery": {"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none"},
                         "retry_schedule": [3600]}}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drained(server_port: int, client_port: int) -> bool:
    """True when the TCP connection between the two local ports has nothing queued either way
    (/proc/net/tcp tx_queue:rx_queue of both ends): the server has read all the client sent."""
    seen = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, queues = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[4]
        if {local, remote} == {server_port, client_port}:
            seen += 1
            tx, rx = (int(x, 16) for x in queues.split(":"))
            if tx or rx:
                return False
    return seen == 2


def _cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime


def wait_handed_over(relay, sent: list[threading.Event], clients: list["Client"], timeout: float = 20) -> None:
    """The clients' bytes are sent, read off their sockets by the relay (nothing queued either way),
    and the relay has been idle since: whatever it does with them now waits on something (the store)."""
    for ev in sent:
        assert ev.wait(timeout), "client did not finish sending"
    wait_until(lambda: all(_drained(relay.ports["implicit"], c.s.sock.getsockname()[1]) for c in clients),
               timeout=timeout, what="the relay to read the messages")
    last = [_cpu_ticks(relay.proc.pid), time.monotonic()]

    def idle() -> bool:
        t = _cpu_ticks(relay.proc.pid)
        if t != last[0]:
            last[:] = [t, time.monotonic()]
            return False
        return time.monotonic() - last[1] > 0.3
    wait_until(idle, timeout=5, what="the relay to go idle")


def _queued_subjects(relay) -> list[str]:
    with contextlib.closing(relay.db()) as conn:
        return sorted(subject_of(bytes(r[0])) for r in conn.execute("SELECT data FROM bodies"))


def test_disk_full_during_data_is_transient_and_recovers(make_relay, tmp_path):
    with _relay_on_tmpfs(make_relay, tmp_path, "16m") as (relay, fs):
        clients = [Client(relay) for _ in range(2)]  # logged in before the disk fills (AUTH writes last_login)
        outcome, _ = clients[0].send("before-full")
        assert outcome == "acked"
        st = os.statvfs(fs)
        filler = fs / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 150_000))
        outcomes = [c.send(f"while-full-{i}", size=1_500_000) for i, c in enumerate(clients)]
        for outcome, detail in outcomes:
            assert outcome == "refused", (outcome, detail)
            code, status = detail.split()[:2]
            assert (code, status) in (("452", "4.3.1"), ("451", "4.3.0")), detail  # transient, never 5xx
        print("disk full replies:", [d for _, d in outcomes])
        assert _queued_subjects(relay) == ["before-full"]  # nothing half-stored
        filler.unlink()
        for i, c in enumerate(clients):  # the same sessions go on once space is back
            outcome, detail = c.send(f"after-full-{i}", size=1_500_000)
            assert outcome == "acked", detail
        assert _queued_subjects(relay) == ["after-full-0", "after-full-1", "before-full"]
        for c in clients:
            c.close()
        assert relay.proc.poll() is None
        m = re.search(r'^relay_store_errors_total\{kind="(full|unavailable)"\} (\S+)$', relay.metrics_text(), re.M)
        assert m and float(m.group(2)) >= 2, "store errors are counted for the operator"
        no_traceback(relay)


def test_disk_full_in_a_group_commit_never_acks_a_lost_message(make_relay, tmp_path):
    """Three messages meet in the writer while another process holds the write lock: a small one
    (blocked in its own batch), then a small one and one too large for the disk, which the writer
    folds into one transaction once the lock goes. Whatever gets 250 must be in the queue."""
    with _relay_on_tmpfs(make_relay, tmp_path, "6m") as (relay, fs):
        a, b, c = (Client(relay, timeout=30) for _ in range(3))
        for cl in (a, b, c):
            assert cl.s.mail(USER)[0] == 250 and cl.s.rcpt("bob@example.net")[0] == 250
            assert cl.s.docmd("DATA")[0] == 354
        blocker = sqlite3.connect(relay.config["storage"]["path"], isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        results: dict[str, tuple[int, bytes]] = {}
        sent = {name: threading.Event() for name in ("first", "victim", "too-big")}

        def finish(name, cl, size):
            cl.s.send(message(name, size) + b".\r\n")
            sent[name].set()
            try:
                results[name] = cl.s.getreply()
            except (smtplib.SMTPException, OSError) as exc:
                results[name] = (0, repr(exc).encode())

        def handed_over(*names_clients) -> None:
            wait_handed_over(relay, [sent[n] for n, _ in names_clients], [c for _, c in names_clients])

        ta = threading.Thread(target=finish, args=("first", a, 0))
        ta.start()
        handed_over(("first", a))          # its batch now waits for the lock alone
        tb = threading.Thread(target=finish, args=("victim", b, 0))
        tc = threading.Thread(target=finish, args=("too-big", c, 9_000_000))
        tb.start()
        handed_over(("victim", b))
        tc.start()
        handed_over(("victim", b), ("too-big", c))   # both pending: the next batch is [victim, too-big]
        blocker.execute("ROLLBACK")
        blocker.close()
        for t in (ta, tb, tc):
            t.join(30)
        print({k: (v[0], v[1][:60]) for k, v in results.items()})
        if results["first"][0] != 250:
            pytest.skip("the lock outlived the relay's busy_timeout before the batch formed (machine too slow)")
        stored = _queued_subjects(relay)
        for name, (code, text) in results.items():
            if code == 250:
                assert name in stored, f"{name} got 250 but is not in the queue (stored: {stored})"
            else:
                assert code in (451, 452, 0), (name, code, text)


@pytest.mark.slow
def test_store_locked_past_busy_timeout_is_451_then_recovers(make_relay):
    relay = make_relay(start=False, config=_hold_queue(_closed_port()))
    relay.add_user(USER, PASSWORD)
    relay.start()
    clients = [Client(relay, timeout=30) for _ in range(2)]
    blocker = sqlite3.connect(relay.config["storage"]["path"], isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # held past the relay's 5 s busy_timeout
    results: list[tuple[str, str]] = []
    try:
        threads = [threading.Thread(target=lambda c=c, i=i: results.append(c.send(f"locked-{i}")))
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert len(results) == 2
    for outcome, detail in results:
        assert outcome == "refused" and detail.startswith("451 4.3.0"), detail
    assert _queued_subjects(relay) == []
    for i, c in enumerate(clients):
        outcome, detail = c.send(f"unlocked-{i}")
        assert outcome == "acked", detail
        c.close()
    assert _queued_subjects(relay) == ["unlocked-0", "unlocked-1"]
    no_traceback(relay)


# ---------------------------------------------------------------- broken peers: defer, back off, deliver

def _broken_tls_context() -> ssl.SSLContext:
    """Offers STARTTLS, fails every handshake (no certificate loaded)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


FAULTS = [
    pytest.param("dns_servfail", id="dns_servfail"),
    pytest.param("dns_drop", id="dns_drop", marks=pytest.mark.slow),
    pytest.param("mx_stall_data", id="mx_stall_data", marks=pytest.mark.slow),
    pytest.param("mx_drop_at_data", id="mx_drop_at_data"),
    pytest.param("tls_broken_required", id="tls_broken_required"),
    pytest.param("tls_untrusted_required", id="tls_untrusted_required", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fault", FAULTS)
def test_peer_fault_defers_with_backoff_then_delivers_once(make_relay, dns_server, fault):
    tls = fault.startswith("tls_")
    mx_host = "mx.test" if tls else "mx.example.net"
    point_dns(dns_server, mx_host)
    if fault == "tls_broken_required":
        bad = MXSink(tls_context=_broken_tls_context(), hostname="mx.test")
    elif fault == "tls_untrusted_required":
        bad = MXSink(tls_context=make_test_tls_context("other.test"), hostname="mx.test")
    else:
        bad = MXSink()
    bad.start()
    sinks = [bad]
    try:
        extra = {}
        env = None
        if tls:
            extra["require_tls_domains"] = ["example.net"]
            env = {"SSL_CERT_FILE": shared_cert_files("mx.test")[0]}  # the operator's CA for mx.test
        # data_done_timeout: the wait for the reply to the final dot is a clock of its own now.
        relay = start(make_relay, dns_server, bad.port, env=env, retry_schedule=[1, 2, 30], command_timeout=2,
                      connect_timeout=2, data_done_timeout=2, config={"dns": {"timeout": 2}}, **extra)
        if fault == "dns_servfail":
            dns_server.servfail.add("example.net")
        elif fault == "dns_drop":
            dns_server.drop.add("example.net")
        elif fault == "mx_stall_data":
            bad.mode = "stall_data"
        elif fault == "mx_drop_at_data":
            bad.mode = "drop_at_data"
        c = Client(relay)
        outcome, qid = c.send(f"fault-{fault}")
        c.close()
        assert outcome == "acked", qid
        assert relay.wait_event("delivery", qid=qid, result="deferred", count=2, timeout=30)
        deferred = relay.events_named("delivery", qid=qid, result="deferred")
        # Backoff: the retry schedule, step by step (1 s, then 2 s).
        assert [e["next_attempt"] for e in deferred[:2]] == [1, 2], deferred
        assert [e["attempt"] for e in deferred[:2]] == [1, 2], deferred
        assert all(e["reply"] for e in deferred), deferred  # the reason is recorded
        # Never lost, never delivered without a remote 2xx.
        [row] = relay.queued()
        assert row["id"] == qid and row["state"] == "deferred" and row["attempts"] >= 2, row
        assert not relay.events_named("delivery", qid=qid, result="delivered")
        assert not bad.messages
        print(f"{fault}: deferred with {deferred[0]['reply']!r}")
        # Fix the peer.
        good = bad
        if fault == "dns_servfail":
            dns_server.servfail.discard("example.net")
        elif fault == "dns_drop":
            dns_server.drop.discard("example.net")
        elif fault in ("mx_stall_data", "mx_drop_at_data"):
            bad.mode = "accept"
        else:
            port = bad.port
            bad.stop()
            good = MXSink(port=port, tls_context=make_test_tls_context("mx.test"), hostname="mx.test").start()
            sinks.append(good)
        assert good.wait_for(1, timeout=30)
        assert relay.wait_event("delivery", qid=qid, result="delivered", timeout=10)
        wait_until(lambda: not relay.queued(), what="an empty queue")
        assert [subject_of(m.data) for m in good.messages] == [f"fault-{fault}"]
        if tls:
            assert good.messages[0].tls
        assert len(relay.events_named("delivery", qid=qid, result="delivered")) == 1
        assert not any(bounces(s) for s in sinks)
        no_traceback(relay)
    finally:
        for s in sinks:
            s.stop()


def test_opportunistic_tls_handshake_failure_falls_back_to_plain_text(make_relay, dns_server):
    with MXSink(tls_context=_broken_tls_context()) as sink:
        point_dns(dns_server)
        relay = start(make_relay, dns_server, sink.port)
        c = Client(relay)
        outcome, qid = c.send("fallback")
        c.close()
        assert outcome == "acked"
        assert sink.wait_for(1, timeout=15)
        assert not sink.messages[0].tls
        assert relay.wait_event("delivery", qid=qid, result="delivered")
        wait_until(lambda: not relay.queued(), what="an empty queue")
        assert len(sink.messages) == 1
        no_traceback(relay)


# ---------------------------------------------------------------- SIGTERM during traffic

def test_sigterm_during_traffic_drains_with_421_and_loses_nothing(make_relay, dns_server):
    grace = 2
    with MXSink() as sink:
        point_dns(dns_server)
        relay = start(make_relay, dns_server, sink.port, config={"server": {"shutdown_grace": grace}})
        idle = Client(relay)                       # between transactions
        stuck = Client(relay)                      # inside a transaction that never finishes
        assert stuck.s.mail(USER)[0] == 250 and stuck.s.rcpt("bob@example.net")[0] == 250
        finishing = Client(relay)                  # inside a transaction it finishes during the grace
        assert finishing.s.mail(USER)[0] == 250 and finishing.s.rcpt("bob@example.net")[0] == 250
        books: dict[str, tuple[str, str]] = {}
        lock = threading.Lock()
        running = threading.Event()
        running.set()

        def traffic(n: int) -> None:
            i = 0
            c = None
            deadline = time.monotonic() + 30
            while running.is_set() and time.monotonic() < deadline and i < 500:
                try:
                    c = c or Client(relay, timeout=10)
                except Exception:  # noqa: BLE001 - listener closed: the drain has begun
                    return
                subject = f"traffic-{n}-{i}"
                i += 1
                outcome, detail = c.send(subject)
                with lock:
                    books[subject] = (outcome, detail)
                if outcome != "acked":
                    c.close()
                    c = None
            if c is not None:
                c.close()

        threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(1 for o, _ in books.values() if o == "acked") >= 10, what="traffic")
        t0 = time.monotonic()
        relay.signal(signal.SIGTERM)
        assert relay.wait_event("stopping", timeout=5)

        code, msg = idle.s.getreply()              # no command sent: the drain speaks first
        assert (code, msg.decode()[:5]) == (421, "4.3.2"), (code, msg)
        assert time.monotonic() - t0 < 1.5, "an idle session is closed at once"

        finishing.s.send(b"DATA\r\n")
        assert finishing.s.getreply()[0] == 354
        finishing.s.send(message("finished-during-grace") + b".\r\n")
        code, msg = finishing.s.getreply()
        assert code == 250, msg
        finished_qid = msg.decode().rsplit(" ", 1)[-1]
        code, msg = finishing.s.getreply()         # transaction over: now it is closed
        assert (code, msg.decode()[:5]) == (421, "4.3.2"), (code, msg)

        code, msg = stuck.s.getreply()             # held for the grace period, then closed
        waited = time.monotonic() - t0
        assert (code, msg.decode()[:5]) == (421, "4.3.2"), (code, msg)
        assert grace - 0.5 <= waited <= grace + 2, waited
        assert relay.proc.wait(grace + 10) == 0
        running.clear()
        for t in threads:
            t.join(15)
        print(f"stuck session closed after {waited:.2f}s; traffic outcomes {Counter(o for o, _ in books.values())}")

        acked = {s: d for s, (o, d) in books.items() if o == "acked"}
        acked["finished-during-grace"] = finished_qid
        with contextlib.closing(relay.db()) as conn:
            queued = {r["id"] for r in conn.execute("SELECT id FROM messages")}
        at_sink = delivered_subjects(sink)
        for subject, qid in acked.items():
            assert subject in at_sink or qid in queued, f"acknowledged {subject} ({qid}) lost at shutdown"
        relay.start()
        wait_until(lambda: set(delivered_subjects(sink)) >= set(acked), timeout=30, what="every acked delivered")
        wait_until(lambda: not relay.queued(), what="an empty queue")
        counts = delivered_subjects(sink)
        for subject, (outcome, detail) in books.items():
            if outcome in ("refused", "unsent"):
                assert counts.get(subject, 0) == 0, (subject, outcome, detail)
        assert all(n == 1 for n in counts.values()), counts  # a clean stop never duplicates
        no_traceback(relay)


def test_sigterm_never_answers_421_for_a_committed_message(make_relay):
    """Hold the store's write lock so a message sits in its commit, SIGTERM, then let it commit:
    whatever the client was told must match what the queue holds."""
    relay = make_relay(start=False, config={**_hold_queue(_closed_port()), "server": {"shutdown_grace": 5}})
    relay.add_user(USER, PASSWORD)
    relay.start()
    c = Client(relay, timeout=30)
    assert c.s.mail(USER)[0] == 250 and c.s.rcpt("bob@example.net")[0] == 250
    assert c.s.docmd("DATA")[0] == 354
    blocker = sqlite3.connect(relay.config["storage"]["path"], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    sent, reply = threading.Event(), []

    def finish():
        c.s.send(message("in-commit-at-sigterm") + b".\r\n")
        sent.set()
        try:
            reply.append(c.s.getreply())
        except (smtplib.SMTPException, OSError) as exc:
            reply.append((0, repr(exc).encode()))

    t = threading.Thread(target=finish)
    try:
        t.start()
        wait_handed_over(relay, [sent], [c])      # read, signed, waiting in the writer for the lock
        relay.signal(signal.SIGTERM)
        assert relay.wait_event("stopping", timeout=5)
        # The drain looks at the sessions every 50 ms: within a second it has closed this one (the bug)
        # or left it alone (right: the command is still running). Either way, then let the commit go.
        deadline = time.monotonic() + 1.0
        while not reply and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    t.join(30)
    assert relay.proc.wait(20) == 0
    [(code, text)] = reply
    if relay.events_named("store_unavailable"):
        pytest.skip("the lock outlived the relay's busy_timeout (machine too slow to set the scene)")
    stored = _queued_subjects(relay)
    print(f"client was told {code} {text[:40]!r}; queue holds {stored}")
    if "in-commit-at-sigterm" in stored:
        assert code == 250, f"committed, yet the client was told {code} {text!r}: it will send it again"
    else:
        assert code != 250, "told 250 for a message that is not in the queue"
