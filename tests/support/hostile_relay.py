"""The relay side of the hostile-destination tests: start it against HostileMX peers, submit, and
decide whether every message has settled (delivered once, deferred with a reason, or bounced).

Settled, as `relay queue show` tells it: a message that is delivered or bounced leaves the queue
(`queue show` exits 1); one still queued must be `deferred` (not in flight) with a `last_error`.
"""
from __future__ import annotations

import json
import re
import threading
import time

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import RelayInstance, wait_until

SENDER_DOMAIN = USER.rpartition("@")[2]
SESSION_MESSAGES = 200


def start_relay(make_relay, dns_server, mx_port: int, *, name: str = "relay", config: dict | None = None,
                users: tuple[str, ...] = (USER,), **delivery) -> RelayInstance:
    cfg = dict(config or {})
    cfg["delivery"] = {**cfg.get("delivery", {}), **delivery}
    relay = make_relay(start=False, name=name, dns=dns_server.address, mx_port=mx_port, config=cfg)
    for u in users:
        relay.add_user(u, PASSWORD)
    return relay.start()


def point(dns_server, domain: str, address: str, host: str | None = None) -> str:
    host = host or f"mx.{domain}"
    dns_server.set(host, "A", [address])
    dns_server.set(domain, "MX", [f"10 {host}."])
    return host


def message(subject: str, size: int = 0, rcpt: str = "bob@hostile.example", sender: str = USER) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@hostile.test>\r\n"
            f"\r\n").encode() + body + b"end\r\n"


def submit(relay: RelayInstance, rcpt: str, subject: str, size: int = 0, sender: str = USER,
           timeout: float = 60) -> str:
    """One message over STARTTLS + AUTH with smtplib; returns the queue id."""
    return relay.submit(USER, PASSWORD, sender, [rcpt], message(subject, size, rcpt, sender), timeout=timeout)


def submit_many(relay: RelayInstance, rcpt: str, n: int, prefix: str, threads: int = 4) -> list[str]:
    """`n` small messages over `threads` authenticated sessions (one transaction after another)."""
    qids: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            s = None
            for j, i in enumerate(range(k, n, threads)):
                if j % SESSION_MESSAGES == 0:  # limits.max_commands (1000) counts per session
                    if s is not None:
                        s.quit()
                    s = relay.smtp(timeout=60)
                    s.login(USER, PASSWORD)
                code, msg = s.mail(USER)
                assert code == 250, msg
                code, msg = s.rcpt(rcpt)
                assert code == 250, msg
                code, msg = s.data(message(f"{prefix}-{i}", 0, rcpt))
                assert code == 250, msg
                with lock:
                    qids.append(msg.decode().rsplit(" ", 1)[-1])
            if s is not None:
                s.quit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    if errors:
        raise errors[0]
    assert len(qids) == n, f"{len(qids)} of {n} accepted"
    return qids


def queue_show(relay: RelayInstance, qid: str) -> dict | None:
    """`relay queue show QID --json` while the message is queued; None once it has left the
    active queue (finished: kept a while for `relay queue history`, or purged)."""
    cp = relay.cli("queue", "show", qid, "--json")
    if cp.returncode == 1:
        return None
    assert cp.returncode == 0, cp.stderr
    shown = json.loads(cp.stdout)
    return None if shown.get("finished_at") is not None else shown


def queue_list(relay: RelayInstance) -> list[dict]:
    return json.loads(relay.cli("queue", "list", "--json", check=True).stdout)


def deferred_with_reason(relay: RelayInstance, qid: str) -> dict | None:
    """The `queue show` record when every recipient is deferred, not in flight, with a reason."""
    m = queue_show(relay, qid)
    if m and m["recipients"] and all(r["state"] == "deferred" and not r["in_flight"] and r["last_error"]
                                     for r in m["recipients"]):
        return m
    return None


def outcomes(relay: RelayInstance, qid: str) -> list[str]:
    return [e["result"] for e in relay.events_named("delivery", qid=qid)]


def delivered(relay: RelayInstance, qid: str) -> bool:
    return "delivered" in outcomes(relay, qid)


def assert_left_queue(relay: RelayInstance, qid: str, timeout: float = 15) -> None:
    wait_until(lambda: queue_show(relay, qid) is None, timeout=timeout, interval=0.2,
               what=f"{qid} to leave the queue (delivered or bounced)")


def metric(relay: RelayInstance, name: str) -> float:
    """Sum of every sample of `name` (any labels) on the relay's /metrics page; 0 if absent."""
    total = 0.0
    for line in relay.metrics_text().splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})? (\S+)$", line)
        if m and m.group(1) == name:
            total += float(m.group(2))
    return total


def until(predicate, timeout: float, what: str, interval: float = 0.05):
    """wait_until with a name that reads well for 'the first of several conditions'."""
    return wait_until(predicate, timeout=timeout, what=what, interval=interval)


def no_traceback(relay: RelayInstance) -> None:
    tb = [i for i, line in enumerate(relay.raw_log) if "Traceback" in line]
    assert not tb, "relay logged a traceback:\n" + "\n".join(relay.raw_log[max(0, tb[0] - 5):tb[0] + 30])


def monotonic() -> float:
    return time.monotonic()
