"""One relay node on PostgreSQL (storage.backend = "postgres"), the whole path with real parts:
the CLI makes the domain and credential, `relay serve` (acceptance and its delivery process)
takes mail over STARTTLS + AUTH and delivers it to the sink, and the CLI, the status command and
the web admin read the same rows. Two nodes on one database share credentials at the next AUTH."""
from __future__ import annotations

import asyncio
import json
import re
import smtplib

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import wait_until


@pytest.fixture
def pg_dsn(pg_server):
    return asyncio.run(pg_server.new_database())


def node(make_relay, dns_server, mx_sink, dsn, name="relay", **config):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    cfg = {"storage": {"backend": "postgres", "dsn": dsn, "pool_size": 4, "commit_timeout": 5},
           "server": {"node_id": name}}
    for k, v in config.items():
        cfg.setdefault(k, {}).update(v)
    return make_relay(start=False, name=name, dns=dns_server.address, mx_port=mx_sink.port, config=cfg)


def test_a_node_on_postgres_accepts_delivers_and_answers_the_cli(make_relay, dns_server, mx_sink, pg_dsn):
    relay = node(make_relay, dns_server, mx_sink, pg_dsn)
    relay.add_user(USER, PASSWORD)  # through the CLI, on PostgreSQL
    relay.start()
    assert relay.wait_event("starting", database=f"postgres {pg_dsn}")
    qid = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], b"Subject: on pg\r\n\r\nhello\r\n")
    assert relay.wait_event("delivery", qid=qid, result="delivered", timeout=20)
    assert mx_sink.wait_for(1)
    assert b"hello" in mx_sink.messages[0].data
    # No SQLite file appeared beside the config: every process opened PostgreSQL.
    assert not (relay.dir / "relay.db").exists()
    out = relay.cli("queue", "history", "--json", check=True)
    rows = json.loads(out.stdout)
    assert [r["id"] for r in rows] == [qid]
    status = json.loads(relay.cli("status", "--json", check=True).stdout)
    assert (status["backend"], status["credentials"], status["finished_messages"]) == ("postgres", 1, 1)
    users = json.loads(relay.cli("user", "list", "--json", check=True).stdout)
    assert [u["username"] for u in users] == [USER]


def test_a_reset_on_one_node_refuses_the_old_password_on_the_other(make_relay, dns_server, mx_sink, pg_dsn):
    one = node(make_relay, dns_server, mx_sink, pg_dsn, name="node1")
    one.add_user(USER, PASSWORD)
    one.start()
    two = node(make_relay, dns_server, mx_sink, pg_dsn, name="node2").start()

    def login(relay, password):
        with relay.smtp() as s:
            try:
                s.login(USER, password)
                return 235
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
    assert login(two, PASSWORD) == 235          # node 2 has the old password verified and cached
    new = "another-long-password-1"
    out = one.cli("user", "reset-password", USER, "--password-stdin", input=new + "\n")
    assert out.returncode == 0, out.stderr
    assert login(two, PASSWORD) == 535          # the reset applies on node 2 at the next AUTH
    assert login(two, new) == 235
    out = one.cli("user", "delete", USER)
    assert out.returncode == 0, out.stderr
    assert login(two, new) == 535


def test_the_api_on_one_node_makes_a_credential_the_other_node_accepts(make_relay, dns_server, mx_sink, pg_dsn):
    """An API key made by node 1's CLI works on node 2's HTTP API (one key table); the credential
    node 2 creates authenticates on node 1's submission port; the audit rows are shared."""
    import requests

    one = node(make_relay, dns_server, mx_sink, pg_dsn, name="node1").start()
    two = node(make_relay, dns_server, mx_sink, pg_dsn, name="node2", admin={"listen": "127.0.0.1:0"}).start()
    assert two.wait_event("listening", admin="/")
    [ev] = two.events_named("listening", admin="/")
    api = f"http://127.0.0.1:{ev['port']}/api/v1"
    out = one.cli("admin", "api-key", "add", "deploy", "--scope", "write", check=True)
    token = next(w for w in out.stdout.split() if w.startswith("rk_"))
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    assert s.post(f"{api}/domains", json={"name": "mg.example.com"}, timeout=10).status_code == 201
    r = s.post(f"{api}/domains/mg.example.com/credentials", json={"login": "app"}, timeout=10)
    assert r.status_code == 201, r.text
    with one.smtp() as c:
        assert c.login("app@mg.example.com", r.json()["password"])[0] == 235
    r = s.post(f"{api}/domains/mg.example.com/credentials", json={"login": "app"}, timeout=10)
    assert r.status_code == 409, r.text    # the same row, seen from the other node's CLI too
    listed = json.loads(one.cli("user", "list", "--json", check=True).stdout)
    assert [u["username"] for u in listed] == ["app@mg.example.com"]


def test_node_list_shows_every_node_its_state_and_its_leases(make_relay, dns_server, mx_sink, pg_dsn):
    """`relay node list` from any node: both nodes up while they run, one stopped after SIGTERM,
    one killed shown by its last heartbeat (silent only after STALE_AFTER: not waited for here)."""
    import signal
    one = node(make_relay, dns_server, mx_sink, pg_dsn, name="node1").start()
    two = node(make_relay, dns_server, mx_sink, pg_dsn, name="node2").start()

    def listed():
        rows = json.loads(one.cli("node", "list", "--json", check=True).stdout)
        return {r["node_id"]: r for r in rows}
    rows = wait_until(lambda: (r := listed()) and len(r) == 2 and r, timeout=15, what="two nodes listed")
    assert {n: r["state"] for n, r in rows.items()} == {"node1": "up", "node2": "up"}
    assert rows["node2"]["pid"] == two.proc.pid and rows["node2"]["leased"] == 0
    two.signal(signal.SIGTERM)
    assert two.proc.wait(timeout=30) == 0
    rows = listed()
    assert (rows["node1"]["state"], rows["node2"]["state"]) == ("up", "stopped")
    human = one.cli("node", "list", check=True).stdout
    assert human.splitlines()[0].split()[:3] == ["NODE", "STATE", "HOST"]
    assert "node2" in human and "stopped" in human


def test_node_list_on_sqlite_shows_the_one_node(make_relay):
    relay = make_relay(config={"server": {"node_id": "solo"}})
    rows = wait_until(lambda: json.loads(relay.cli("node", "list", "--json", check=True).stdout), timeout=15,
                      what="the node listed")
    assert [(r["node_id"], r["state"]) for r in rows] == [("solo", "up")]
    # The node names itself in the one info metric the dashboard's per-node row joins on.
    assert re.search(r'^relay_build_info\{node="solo",version="[^"]+"\} 1\.0$', relay.metrics_text(), re.M)


def test_a_large_message_on_postgres_arrives_whole_and_signed(make_relay, dns_server, mx_sink, pg_dsn):
    """6 MB with dot-led lines through one PostgreSQL node: stored in pieces, signed and sent from
    them; the sink gets the content exactly, with the DKIM-Signature field on top."""
    relay = node(make_relay, dns_server, mx_sink, pg_dsn)
    relay.add_user(USER, PASSWORD)
    relay.start()
    line = b".a dot-led line, which the wire form carries as two dots: x" + b"y" * 40 + b"\r\n"
    body = b"Subject: big on pg\r\n\r\n" + line * (6 * 1024 * 1024 // len(line))
    qid = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], body, timeout=60)
    assert relay.wait_event("delivery", qid=qid, result="delivered", timeout=60)
    assert mx_sink.wait_for(1)
    got = mx_sink.messages[0].data
    assert got.endswith(line * 3) and got.count(line) == body.count(line)
    assert b"DKIM-Signature:" in got[:got.find(b"\r\n\r\n")]

def test_guesses_spread_over_two_nodes_share_one_budget(make_relay, dns_server, mx_sink, pg_dsn):
    """Two `relay serve` nodes on one PostgreSQL, auth_failures = 4: wrong passwords alternating
    between them get 535 four times, then 454 4.7.0 on both, the right password included
    (per node that would be 8 guesses)."""
    limits = {"limits": {"auth_failures": 4, "auth_failure_delay": 0}}
    one = node(make_relay, dns_server, mx_sink, pg_dsn, name="node1", **limits)
    one.add_user(USER, PASSWORD)
    one.start()
    two = node(make_relay, dns_server, mx_sink, pg_dsn, name="node2", **limits).start()

    def login(relay, password):
        with relay.smtp() as s:
            s.user, s.password = USER, password
            try:
                return s.auth("PLAIN", s.auth_plain)[0]  # PLAIN only: s.login would try LOGIN too
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
    codes = [login((one, two)[i % 2], f"wrong guess {i}") for i in range(8)]
    assert codes == [535] * 4 + [454] * 4
    assert login(one, PASSWORD) == 454 and login(two, PASSWORD) == 454
