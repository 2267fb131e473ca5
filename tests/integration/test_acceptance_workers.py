"""Acceptance workers (issue 16, `server.acceptance_workers` > 1) over real sockets.

The parent `relay serve` accepts, applies limits.connections and limits.connections_per_ip,
hands each socket to the least busy worker and counts it until the worker releases it; AUTH
budgets live in the parent; a dead worker is restarted and its slots released; metrics are
summed; SIGHUP and SIGTERM reach the workers.

The parent picks the worker holding the fewest connections (ties: the first), so connections
held open at the same time alternate over 2 workers; connections opened one after the other,
each closed first, would all land on worker 0. Tests that must spread work over both workers
therefore hold their connections open together.
"""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import threading
import time

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import RawSMTP, at_once, b64, connect, metric, start_relay
from tests.support.relay_instance import RelayInstance, client_tls_context, wait_until

WORKERS = 2


def workers_config(**limits) -> dict:
    return {"server": {"acceptance_workers": WORKERS}, "limits": {"auth_failure_delay": 0.05, **limits}}


def worker_pids(relay: RelayInstance) -> dict[int, int]:
    """worker index -> pid of its latest start (acceptance_worker_started events)."""
    return {e["worker"]: e["pid"] for e in relay.events_named("acceptance_worker_started")}


def wait_workers_started(relay: RelayInstance, count: int = WORKERS, timeout: float = 20) -> None:
    assert relay.wait_event("acceptance_worker_started", count=count, timeout=timeout), \
        "\n".join(relay.raw_log[-30:])


def wait_sessions_closed(relay: RelayInstance, timeout: float = 10) -> None:
    wait_until(lambda: metric(relay, "relay_sessions_active") == 0, timeout=timeout,
               what="every session (in every worker) to close")


def banner_code(relay: RelayInstance, source: str | None = None, implicit: bool = False) -> int | None:
    """The first reply's code of a new connection (None: closed without one), then hang up."""
    try:
        c = connect(relay, source=source, implicit=implicit, timeout=10)
    except (EOFError, ConnectionError, ssl.SSLError):
        return None
    try:
        return c.banner.code
    finally:
        c.close()


def wait_banner_220(relay: RelayInstance, source: str | None = None, timeout: float = 10) -> RawSMTP:
    """Connect until a 220 comes back (the parent heard the release); return that held connection."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            c = connect(relay, source=source, timeout=10)
            last = c.banner
            if c.banner.code == 220:
                return c
            c.close()
        except (EOFError, ConnectionError) as exc:
            last = exc
        assert time.monotonic() < deadline, f"no 220 within {timeout}s; last: {last}"
        time.sleep(0.05)


def assert_refused(relay: RelayInstance, reply, source: str | None = None) -> None:
    c = connect(relay, source=source)
    try:
        assert c.banner.is_(reply), str(c.banner)
        assert c.closed()
    finally:
        c.close()


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _server_inode(client: socket.socket) -> int | None:
    """The inode of the relay's end of this client connection (from /proc/net/tcp)."""
    cport = client.getsockname()[1]
    sport = client.getpeername()[1]
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], int(f[9])
        if int(local.split(":")[1], 16) == sport and int(remote.split(":")[1], 16) == cport and inode:
            return inode
    return None


def holder(relay: RelayInstance, client: socket.socket | RawSMTP | smtplib.SMTP) -> int | None:
    """The pid of the worker holding this client's connection (None: no worker holds it)."""
    sock = client if isinstance(client, socket.socket) else client.sock
    inode = wait_until(lambda: _server_inode(sock), timeout=5, what="the relay's end in /proc/net/tcp")
    target = f"socket:[{inode}]"
    for pid in worker_pids(relay).values():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                pass
    return None


# ---------------------------------------------------------------- a shared relay for the caps

@pytest.fixture(scope="module")
def caps_relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("workers-caps"), config=workers_config(
        connections_per_ip=3, connections=5, idle_timeout=60))
    wait_workers_started(inst)
    yield inst
    inst.stop()


@pytest.fixture
def caps(caps_relay):
    wait_sessions_closed(caps_relay)
    return caps_relay


# ---------------------------------------------------------------- 1. delivery and metrics

def test_mail_through_workers_is_delivered_exactly_once_and_metrics_are_summed(make_relay, dns_server, mx_sink):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port, config=workers_config())
    relay.add_user(USER, PASSWORD)
    relay.start()
    wait_workers_started(relay)
    conns, per_conn = 10, 3
    acked: dict[str, str] = {}  # subject -> queue id from the 250
    holders: list[int | None] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(conns)

    def client(n: int) -> None:
        try:
            s = relay.smtp(timeout=20)
            try:
                s.login(USER, PASSWORD)
                with lock:
                    holders.append(holder(relay, s))
                barrier.wait(20)  # all 10 sessions open at once: both workers hold some
                for i in range(per_conn):
                    subject = f"w-{n}-{i}"
                    code, msg = s.mail(USER)
                    assert code == 250, (code, msg)
                    code, msg = s.rcpt(f"{subject}@example.net")
                    assert code == 250, (code, msg)
                    code, msg = s.data(f"Subject: {subject}\r\n\r\nbody {subject}\r\n".encode())
                    assert code == 250, (code, msg)
                    with lock:
                        acked[subject] = msg.decode().rsplit(" ", 1)[-1]
            finally:
                s.quit()
        except Exception as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(f"{n}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(set(holders)) == sorted(worker_pids(relay).values()), holders  # both workers served
    assert len(acked) == conns * per_conn
    assert len(set(acked.values())) == conns * per_conn  # one queue id each
    assert mx_sink.wait_for(conns * per_conn, timeout=30), f"{len(mx_sink.messages)} delivered"
    for qid in acked.values():
        assert relay.wait_event("delivery", qid=qid, result="delivered", timeout=15), qid
    delivered = sorted(r for m in mx_sink.messages for r in m.rcpt_tos)
    assert delivered == sorted(f"{s}@example.net" for s in acked), "not exactly once each"
    text = relay.metrics_text()
    assert re.search(r'^relay_messages_accepted_total\{kind="submission"\} 30\.0$', text, re.M), \
        [l for l in text.splitlines() if "accepted" in l]
    assert metric(relay, "relay_messages_accepted_total") == conns * per_conn
    assert metric(relay, "relay_connections_total") == conns
    assert len(re.findall(r"^# TYPE relay_messages_accepted_total counter$", text, re.M)) == 1


# ---------------------------------------------------------------- 2. and 3. the caps, exact

def test_connections_per_ip_is_exact_across_workers(caps):
    ip = "127.0.1.10"
    held = [connect(caps, source=ip) for _ in range(3)]  # alternate over the 2 workers
    try:
        assert [c.banner.code for c in held] == [220, 220, 220]
        assert len({holder(caps, c) for c in held} - {None}) == WORKERS  # spread over both workers
        assert_refused(caps, replies.TOO_MANY_CONNECTIONS_IP, source=ip)
        assert_refused(caps, replies.TOO_MANY_CONNECTIONS_IP, source=ip)  # refusals hold no slot
        # Another address is not affected; the held sessions still work.
        assert banner_code(caps, source="127.0.1.11") == 220
        assert all(c.cmd("NOOP").code == 250 for c in held)
        # One leaves: its worker's release reaches the parent and the slot is free again...
        assert held[1].cmd("QUIT").code == 221
        held[1].close()
        held[1] = wait_banner_220(caps, source=ip)
        # ...once: with 3 held again, the next is refused (the release was not counted twice).
        assert_refused(caps, replies.TOO_MANY_CONNECTIONS_IP, source=ip)
        # A hang-up without QUIT frees its slot too.
        held[0].close()
        held[0] = wait_banner_220(caps, source=ip)
        assert_refused(caps, replies.TOO_MANY_CONNECTIONS_IP, source=ip)
    finally:
        for c in held:
            c.close()
    assert metric(caps, "relay_connections_refused_total", reason="per_ip") >= 4


def test_global_connection_cap_is_exact_across_workers(caps):
    before = metric(caps, "relay_connections_refused_total", reason="global")
    held = [connect(caps, source=f"127.0.1.{20 + i // 2}") for i in range(5)]  # connections = 5
    try:
        assert all(c.banner.code == 220 for c in held), [str(c.banner) for c in held]
        assert len({holder(caps, c) for c in held} - {None}) == WORKERS
        assert_refused(caps, replies.TOO_MANY_CONNECTIONS, source="127.0.1.30")
        assert banner_code(caps, source="127.0.1.31", implicit=True) is None  # no TLS past the cap
        assert metric(caps, "relay_connections_refused_total", reason="global") == before + 2
        held[2].close()
        held[2] = wait_banner_220(caps, source="127.0.1.32")
        assert_refused(caps, replies.TOO_MANY_CONNECTIONS, source="127.0.1.33")
    finally:
        for c in held:
            c.close()
    wait_sessions_closed(caps)
    assert banner_code(caps, source="127.0.1.34") == 220


# ---------------------------------------------------------------- 4. AUTH budget shared

def test_auth_lockout_budget_is_shared_by_the_workers(tmp_path):
    relay = start_relay(tmp_path, config=workers_config(
        auth_failures=3, auth_failure_window=300, auth_lockout=600, auth_failures_per_network=8,
        auth_failures_per_user=5, auth_user_window=3600, connections_per_ip=20))
    try:
        wait_workers_started(relay)
        ip = "127.0.2.50"
        # Eight sessions open at once: the parent gives them alternately to worker 0 and 1.
        conns = [connect(relay, source=ip).secure() for _ in range(8)]
        try:
            on = [holder(relay, c) for c in conns]
            # Three guessing sessions on each worker: a budget per worker would answer 6 x 535.
            assert None not in on and sorted(on[:6].count(p) for p in set(on[:6])) == [3, 3], on
            assert len(set(on[6:])) == 2, on
            got = [c.auth_plain(USER, f"wrong guess {i}") for i, c in enumerate(conns[:6])]
            assert [r.is_(replies.AUTH_INVALID) for r in got] == [True, True, True, False, False, False], \
                [str(r) for r in got]
            assert all(r.is_(replies.AUTH_LOCKED) or r.is_(replies.AUTH_LOCKED_USER) for r in got[3:]), \
                [str(r) for r in got]
            assert all(r.code == 454 and r.lines[-1].startswith("4.7.0") for r in got[3:])
            # Locked out on both workers, even with the right password.
            for c in conns[6:]:
                r = c.auth_plain(USER, PASSWORD)
                assert r.code == 454 and r.lines[-1].startswith("4.7.0"), str(r)
        finally:
            for c in conns:
                c.close()
        with connect(relay, source=ip).secure() as c:
            r = c.auth_plain(USER, PASSWORD)
            assert r.code == 454 and r.lines[-1].startswith("4.7.0"), str(r)
        # Guesses at the same moment on both workers (another address and username): still 3.
        ip2 = "127.0.2.70"
        conns = [connect(relay, source=ip2).secure() for _ in range(8)]
        try:
            assert len({holder(relay, c) for c in conns} - {None}) == WORKERS
            got2 = at_once(len(conns), lambda i: conns[i].auth_plain("nobody@mg.example.com", f"guess {i}"),
                           timeout=30)
        finally:
            for c in conns:
                c.close()
        assert len(got2) == 8
        assert sum(r.is_(replies.AUTH_INVALID) for r in got2.values()) == 3, [str(r) for r in got2.values()]
        assert all(r.is_(replies.AUTH_INVALID) or r.code == 454 for r in got2.values())
        # Another address is unaffected (AUTH works through the workers at all).
        with connect(relay, source="127.0.2.60").secure() as c:
            assert c.auth_plain(USER, PASSWORD).is_(replies.AUTH_OK)
        assert metric(relay, "relay_auth_attempts_total", result="failure") == 6, \
            [l for l in relay.metrics_text().splitlines() if l.startswith("relay_auth_attempts_total")]
        assert relay.events_named("auth_lockout", client=ip)
        # The budget lives in the parent: restarting every worker does not forget the lockout.
        for index, pid in worker_pids(relay).items():
            os.kill(pid, signal.SIGKILL)
        assert relay.wait_event("acceptance_worker_started", count=2 * WORKERS, timeout=20)
        conns = [wait_banner_220(relay, source=ip) for _ in range(2)]
        try:
            for c in conns:
                r = c.secure().auth_plain(USER, PASSWORD)
                assert r.code == 454 and r.lines[-1].startswith("4.7.0"), str(r)
        finally:
            for c in conns:
                c.close()
    finally:
        relay.stop()


# ---------------------------------------------------------------- 5. a worker killed

def test_a_killed_worker_is_restarted_its_slots_freed_and_no_acknowledged_mail_lost(make_relay, dns_server, mx_sink):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                       config=workers_config(connections_per_ip=2))
    relay.add_user(USER, PASSWORD)
    relay.start()
    wait_workers_started(relay)
    pids = worker_pids(relay)
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2, pids
    kids = {int(p) for p in open(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read().split()}
    assert set(pids.values()) <= kids, (pids, kids)

    acked: list[str] = []
    for i in range(6):  # submissions one after the other (worker 0 takes them: least busy)
        acked.append(relay.submit(USER, PASSWORD, USER, [f"before{i}@example.net"],
                                  f"Subject: before {i}\r\n\r\nx\r\n".encode()))
    ip = "127.0.3.10"
    held = [connect(relay, source=ip).secure() for _ in range(2)]  # one on each worker
    try:
        assert_refused(relay, replies.TOO_MANY_CONNECTIONS_IP, source=ip)
        on = [holder(relay, c) for c in held]
        assert None not in on and len(set(on)) == 2, on  # one on each worker
        victim = on[0]
        index = next(i for i, p in pids.items() if p == victim)
        # A message acknowledged on the victim's session, which stays open until the kill.
        held[0].login()
        assert held[0].cmd(f"MAIL FROM:<{USER}>").code == 250
        assert held[0].cmd("RCPT TO:<open-session@example.net>").code == 250
        assert held[0].cmd("DATA").code == 354
        r = held[0].cmd(b"Subject: open session\r\n\r\nx\r\n.")
        assert r.code == 250, str(r)
        acked.append(r.lines[-1].rsplit(" ", 1)[-1])
        os.kill(victim, signal.SIGKILL)
        assert relay.wait_event("acceptance_worker_exited", worker=index, pid=victim, timeout=10), \
            "\n".join(relay.raw_log[-20:])
        exited = relay.events_named("acceptance_worker_exited", worker=index, pid=victim)[0]
        assert exited.get("code") == -signal.SIGKILL, exited
        assert exited.get("connections_lost") == 1, exited
        assert relay.wait_event("acceptance_worker_started", worker=index, count=2, timeout=20), \
            "\n".join(relay.raw_log[-20:])
        assert worker_pids(relay)[index] != victim
        wait_until(lambda: not alive(victim), timeout=10, what="the killed worker reaped")
        # The held session on the dead worker is gone; the one on the other worker works.
        assert _session_gone(held[0])
        survivor = held[1]
        assert survivor.cmd("NOOP").code == 250
        # The dead worker's slot is back: one new connection from ip is admitted, then the cap holds.
        again = wait_banner_220(relay, source=ip)
        try:
            assert_refused(relay, replies.TOO_MANY_CONNECTIONS_IP, source=ip)
        finally:
            again.close()
        survivor.close()
        # Both slots free once the survivor leaves too.
        two = [wait_banner_220(relay, source=ip)]
        two.append(wait_banner_220(relay, source=ip))
        for c in two:
            c.close()
    finally:
        for c in held:
            c.close()
    # Mail flows through the restarted worker too (both workers busy: 2 sessions held at once).
    a, b = relay.smtp(), relay.smtp()
    try:
        assert {holder(relay, a), holder(relay, b)} == set(worker_pids(relay).values())
        for n, s in enumerate((a, b)):
            s.login(USER, PASSWORD)
            s.mail(USER)
            s.rcpt(f"after{n}@example.net")
            code, msg = s.data(f"Subject: after {n}\r\n\r\nx\r\n".encode())
            assert code == 250, (code, msg)
            acked.append(msg.decode().rsplit(" ", 1)[-1])
    finally:
        a.quit()
        b.quit()
    assert mx_sink.wait_for(len(acked), timeout=30), f"{len(mx_sink.messages)} of {len(acked)} delivered"
    for qid in acked:
        assert relay.wait_event("delivery", qid=qid, result="delivered", timeout=15), qid
    rcpts = sorted(r for m in mx_sink.messages for r in m.rcpt_tos)
    assert rcpts == sorted([f"before{i}@example.net" for i in range(6)]
                           + ["open-session@example.net", "after0@example.net", "after1@example.net"])


def _session_gone(c: RawSMTP) -> bool:
    try:
        r = c.cmd("NOOP")
    except (EOFError, ConnectionError, ssl.SSLError, OSError):
        return True
    assert r.code == 250, str(r)
    return False


# ---------------------------------------------------------------- 6. SIGHUP and SIGTERM

def _serial(c: RawSMTP) -> int:
    from cryptography import x509
    return x509.load_der_x509_certificate(c.sock.getpeercert(binary_form=True)).serial_number


def _size_advertised(ehlo) -> int | None:
    for line in ehlo.lines:
        m = re.match(r"SIZE (\d+)", line)
        if m:
            return int(m.group(1))
    return None


def test_sighup_reaches_the_workers_and_sigterm_drains_them(tmp_path):
    relay = start_relay(tmp_path, config=workers_config(connections_per_ip=4, message_size=100_000))
    wait_workers_started(relay)
    big = "Subject: big\r\n\r\n" + ("y" * 76 + "\r\n") * 200  # ~15 KB
    try:
        pair = [connect(relay).secure() for _ in range(2)]  # one per worker
        try:
            assert len({holder(relay, c) for c in pair} - {None}) == WORKERS
            assert [_size_advertised(c.ehlo()) for c in pair] == [100_000, 100_000]
            serials = {_serial(c) for c in pair}
            assert len(serials) == 1
            old_serial = serials.pop()
        finally:
            for c in pair:
                c.close()
        relay.config["limits"]["message_size"] = 10_000
        relay.config["limits"]["connections_per_ip"] = 2
        relay.write_config()
        assert relay.cli("cert", "selfsigned", "--force", "--hostname", "relay.test").returncode == 0
        relay.signal(signal.SIGHUP)
        assert relay.wait_event("reloaded", timeout=10)

        def both_workers_reloaded() -> bool:
            conns = [connect(relay, source="127.0.4.1").secure() for _ in range(2)]
            try:
                assert len({holder(relay, c) for c in conns} - {None}) == WORKERS
                return [_size_advertised(c.ehlo()) for c in conns] == [10_000, 10_000] \
                    and old_serial not in {_serial(c) for c in conns}
            finally:
                for c in conns:
                    c.close()
        wait_until(both_workers_reloaded, timeout=10, interval=0.2,
                   what="SIZE 10000 and the new certificate on both workers")
        assert not relay.events_named("reload_failed")
        # The new size is enforced by the workers at DATA...
        s = relay.smtp()
        try:
            s.login(USER, PASSWORD)
            assert s.mail(USER)[0] == 250
            assert s.rcpt("x@example.net")[0] == 250
            code, msg = s.data(big.encode())
            assert code == 552, (code, msg)
        finally:
            s.close()
        # ...and the new per-IP cap by the parent.
        wait_sessions_closed(relay)
        held = [connect(relay, source="127.0.4.2") for _ in range(2)]
        try:
            assert all(c.banner.code == 220 for c in held)
            assert_refused(relay, replies.TOO_MANY_CONNECTIONS_IP, source="127.0.4.2")
        finally:
            for c in held:
                c.close()
        wait_sessions_closed(relay)
        # SIGTERM with idle sessions open on both workers: each is told 421, the relay exits 0.
        idle = [connect(relay, source="127.0.4.3").secure() for _ in range(2)]
        assert len({holder(relay, c) for c in idle} - {None}) == WORKERS
        busy = connect(relay, source="127.0.4.4").secure().login()
        assert busy.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert busy.cmd("RCPT TO:<drain@example.net>").code == 250
        grace = relay.config["server"]["shutdown_grace"]
        worker_procs = list(worker_pids(relay).values())
        relay.signal(signal.SIGTERM)
        for c in idle:
            r = c.read()
            assert r.code == 421 and r.lines[-1].startswith("4.3.2"), str(r)
            assert c.closed()
            c.close()
        # The session in a transaction is let finish within the grace period, then told 421.
        assert busy.cmd("DATA").code == 354
        done = busy.cmd(b"Subject: drain\r\n\r\nx\r\n.")
        assert done.code == 250, str(done)
        drained_qid = done.lines[-1].rsplit(" ", 1)[-1]
        r = busy.read()
        assert r.code == 421, str(r)
        busy.close()
        assert relay.proc.wait(grace + 10) == 0
        assert drained_qid in {row["id"] for row in relay.queued()}
        relay.stop()
        assert relay.events_named("stopped")
        for pid in worker_procs:
            assert not alive(pid), f"worker {pid} outlived the relay"
    finally:
        relay.stop()


# ---------------------------------------------------------------- 7. hostile clients

def test_silent_and_stalled_clients_do_not_block_others(tmp_path):
    relay = start_relay(tmp_path, config=workers_config(connections_per_ip=50, idle_timeout=60,
                                                        tls_handshake_timeout=60))
    wait_workers_started(relay)
    hostile: list[socket.socket] = []
    try:
        for i in range(4):
            # Connects and never reads or sends.
            hostile.append(socket.create_connection(("127.0.0.1", relay.port), timeout=5,
                                                    source_address=("127.0.5.1", 0)))
            # Half a command, then silence.
            half = socket.create_connection(("127.0.0.1", relay.port), timeout=5, source_address=("127.0.5.2", 0))
            half.recv(1024)
            half.sendall(b"EHLO half.test\r\nMAIL FROM:<stall")
            hostile.append(half)
            # Implicit TLS: never sends a ClientHello; and one that sends half a ClientHello.
            hostile.append(socket.create_connection(("127.0.0.1", relay.ports["implicit"]), timeout=5,
                                                    source_address=("127.0.5.3", 0)))
            partial = socket.create_connection(("127.0.0.1", relay.ports["implicit"]), timeout=5,
                                               source_address=("127.0.5.4", 0))
            partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            hostile.append(partial)
        wait_until(lambda: metric(relay, "relay_sessions_active") >= 16, timeout=10,
                   what="the hostile sessions to be open in the workers")
        on = [holder(relay, s) for s in hostile]
        assert None not in on and len(set(on)) == WORKERS, on  # both workers have their share
        # Others get their 250s, on both workers (two sessions at once, four times).
        for round_ in range(4):
            a, b = relay.smtp(timeout=10), relay.smtp(timeout=10)
            try:
                assert len({holder(relay, a), holder(relay, b)} - {None}) == WORKERS
                for n, s in enumerate((a, b)):
                    s.login(USER, PASSWORD)
                    assert s.mail(USER)[0] == 250
                    assert s.rcpt(f"ok{round_}-{n}@example.net")[0] == 250
                    code, msg = s.data(f"Subject: ok {round_} {n}\r\n\r\nx\r\n".encode())
                    assert code == 250, (code, msg)
            finally:
                a.quit()
                b.quit()
        assert metric(relay, "relay_messages_accepted_total") == 8
        # The hostile connections are still held (nobody cut them to make room).
        assert metric(relay, "relay_sessions_active") >= 16
    finally:
        for s in hostile:
            s.close()
        relay.stop()


# ---------------------------------------------------------------- 8. config validation

@pytest.mark.parametrize("value", [-1, 65])
def test_check_config_refuses_out_of_range_worker_counts(tmp_path, value):
    inst = RelayInstance(tmp_path / "relay", config={"server": {"acceptance_workers": value}})
    cp = inst.cli("check-config")
    assert cp.returncode != 0, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("relay: ") and "server.acceptance_workers" in lines[0], lines[0]
    assert str(value) in lines[0], lines[0]


@pytest.mark.parametrize("value", [0, 1, 64])
def test_check_config_accepts_worker_counts_in_range(tmp_path, value):
    inst = RelayInstance(tmp_path / "relay", config={"server": {"acceptance_workers": value}})
    cp = inst.cli("check-config")
    assert cp.returncode == 0, (cp.returncode, cp.stdout, cp.stderr)
    assert f"acceptance_workers = {value}" in cp.stdout


# ---------------------------------------------------------------- counters across a worker restart

def test_summed_counters_do_not_go_backwards_when_a_worker_restarts(tmp_path):
    """A Prometheus counter may reset only when the process exposing it restarts. The relay
    (the parent serving /metrics) keeps running when one worker dies: the summed
    relay_messages_accepted_total and relay_connections_total must not drop, else rate() and
    increase() read the drop as a reset and report a spike of the whole remaining total."""
    relay = start_relay(tmp_path, config=workers_config())
    try:
        wait_workers_started(relay)
        sessions = [relay.smtp(), relay.smtp()]  # one on each worker
        try:
            assert len({holder(relay, s) for s in sessions} - {None}) == WORKERS
            for n, s in enumerate(sessions):
                s.login(USER, PASSWORD)
                for i in range(2):
                    assert s.mail(USER)[0] == 250
                    assert s.rcpt(f"c{n}-{i}@example.net")[0] == 250
                    assert s.data(b"Subject: c\r\n\r\nx\r\n")[0] == 250
        finally:
            for s in sessions:
                s.quit()
        wait_sessions_closed(relay)
        accepted = metric(relay, "relay_messages_accepted_total")
        connections = metric(relay, "relay_connections_total")
        assert (accepted, connections) == (4, 2)
        pids = worker_pids(relay)
        os.kill(pids[0], signal.SIGKILL)
        assert relay.wait_event("acceptance_worker_started", worker=0, count=2, timeout=20)
        after = (metric(relay, "relay_messages_accepted_total"), metric(relay, "relay_connections_total"))
        assert after[0] >= accepted and after[1] >= connections, \
            f"counters went backwards while the relay kept running: {(accepted, connections)} -> {after}"
    finally:
        relay.stop()


# ---------------------------------------------------------------- per-process limits split over workers

def test_tls_handshakes_in_progress_stay_within_the_configured_limit_node_wide(tmp_path):
    """acceptance_process.py: each worker gets a share of limits.tls_handshakes "so the node as
    a whole stays within them". With 3 configured and 2 workers, at most 3 handshakes may be in
    progress on the node; the rest are refused (closed at once on the implicit-TLS port)."""
    relay = start_relay(tmp_path, config=workers_config(tls_handshakes=3, tls_handshake_timeout=30,
                                                        connections_per_ip=50))
    stalled: list[socket.socket] = []
    try:
        wait_workers_started(relay)
        for i in range(8):  # implicit TLS, no ClientHello: each is a handshake in progress
            stalled.append(socket.create_connection(("127.0.0.1", relay.ports["implicit"]), timeout=5,
                                                    source_address=("127.0.6.1", 0)))
        wait_until(lambda: metric(relay, "relay_connections_refused_total", reason="tls_handshakes")
                   + metric(relay, "relay_tls_handshakes_in_progress") >= 8, timeout=10,
                   what="every stalled connection counted as in progress or refused")
        in_progress = metric(relay, "relay_tls_handshakes_in_progress")
        refused = metric(relay, "relay_connections_refused_total", reason="tls_handshakes")
        assert (in_progress, refused) == (3, 5), \
            f"{in_progress:g} handshakes in progress with limits.tls_handshakes = 3 ({refused:g} refused)"
    finally:
        for s in stalled:
            s.close()
        relay.stop()


# ---------------------------------------------------------------- 0 = one per core; dying with the parent

def test_zero_workers_means_one_per_core_and_they_die_with_the_parent(tmp_path):
    relay = start_relay(tmp_path, config={"server": {"acceptance_workers": 0}})
    try:
        cores = os.cpu_count() or 1
        if cores > 1:
            wait_workers_started(relay, count=cores)
            assert sorted(worker_pids(relay)) == list(range(cores))
        else:
            assert not relay.events_named("acceptance_worker_started")  # 1 core: in-process sessions
        with relay.smtp() as s:
            s.login(USER, PASSWORD)
            assert s.sendmail(USER, ["core@example.net"], b"Subject: c\r\n\r\nx\r\n") == {}
        pids = list(worker_pids(relay).values())
        relay.kill()  # SIGKILL: the parent has no chance to stop them
        for pid in pids:
            wait_until(lambda: not alive(pid), timeout=10, what=f"worker {pid} to die with its parent")
    finally:
        relay.stop()


# ---------------------------------------------------------------- SIGHUP while a worker restarts

def test_a_reload_while_a_worker_restarts_does_not_kill_the_new_worker(tmp_path):
    """SIGHUP (logrotate, a certificate renewal) may come at any time, also while a dead worker's
    replacement is starting. The parent forwards SIGHUP to every worker process it has; the new
    one must not die of it (the default action of SIGHUP) before it has its handler. SIGHUPs are
    sent every 50 ms from the worker's death until its replacement is up, so that one of them
    lands in its start-up; each is a valid reload."""
    relay = start_relay(tmp_path, config=workers_config())
    try:
        wait_workers_started(relay)
        victim = worker_pids(relay)[0]
        os.kill(victim, signal.SIGKILL)
        assert relay.wait_event("acceptance_worker_exited", worker=0, pid=victim, timeout=10)
        deadline = time.monotonic() + 12
        while not relay.events_named("acceptance_worker_started", worker=0)[1:] and time.monotonic() < deadline:
            relay.signal(signal.SIGHUP)
            time.sleep(0.05)
        assert not relay.events_named("reload_failed")
        failed = relay.events_named("acceptance_worker_restart_failed")
        exits = relay.events_named("acceptance_worker_exited")
        assert not failed and len(exits) == 1, [failed, exits]
        assert len(relay.events_named("acceptance_worker_started", worker=0)) == 2
        # And the replacement serves (two sessions at once: one on each worker).
        a, b = relay.smtp(), relay.smtp()
        try:
            assert {holder(relay, a), holder(relay, b)} == set(worker_pids(relay).values())
            for s in (a, b):
                s.login(USER, PASSWORD)
        finally:
            a.quit()
            b.quit()
    finally:
        relay.stop()


# ---------------------------------------------------------------- a stopped worker

def test_a_stopped_worker_gets_no_more_connections_and_its_client_is_served_later(tmp_path):
    """A worker that stops answering (SIGSTOP, stuck in a loop) must not keep taking clients:
    past STALLED without acknowledging a hand-over it is skipped, so every new client is served
    by the others; the client it held is served when it resumes, not lost."""
    relay = start_relay(tmp_path, config=workers_config())
    stuck = None
    try:
        wait_workers_started(relay)
        pid0 = worker_pids(relay)[0]
        os.kill(pid0, signal.SIGSTOP)
        try:
            # Nobody holds a connection: the first goes to worker 0 (the tie's first), which is stopped.
            stuck = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            stuck.settimeout(1.5)
            with pytest.raises(socket.timeout):
                stuck.recv(100)  # no banner; this wait also outlasts workers.STALLED
            for _ in range(6):  # least-busy alone would send every other one to worker 0
                c = connect(relay, timeout=5)
                assert c.banner.code == 220, str(c.banner)
                c.close()
        finally:
            os.kill(pid0, signal.SIGCONT)
        stuck.settimeout(10)
        assert stuck.recv(100).startswith(b"220 ")
    finally:
        if stuck is not None:
            stuck.close()
        relay.stop()
