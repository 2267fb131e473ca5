"""The web admin in the real relay process: started from [admin] listen, accounts from the CLI
(`relay admin add/list/passwd/remove`), the fail2ban line for failed logins, stopped by SIGTERM."""
from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from tests.support import tools
from tests.support.relay_instance import RelayInstance

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "relay-admin.conf"
JAIL = ROOT / "contrib" / "fail2ban" / "jail.d" / "relay.conf"
COOKIE = "__Host-relay_admin"
ADMIN_PW = "a long admin password"


def post(port: int, path: str, fields: dict, *, source: str = "127.0.0.1", cookie: str | None = None,
         headers: dict | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    h = {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin", **(headers or {})}
    if cookie:
        h["Cookie"] = f"{COOKIE}={cookie}"
    conn.request("POST", path, urllib.parse.urlencode(fields), h)
    r = conn.getresponse()
    r.body = r.read().decode()
    conn.close()
    return r


def get(port: int, path: str, cookie: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Cookie": f"{COOKIE}={cookie}"} if cookie else {})
    r = conn.getresponse()
    r.body = r.read().decode()
    conn.close()
    return r


def login(port: int, name: str = "boss", password: str = ADMIN_PW, source: str = "127.0.0.1") -> str | None:
    r = post(port, "/login", {"username": name, "password": password}, source=source)
    if r.status != 303:
        return None
    m = re.search(rf"{COOKIE}=([^;]+)", r.getheader("Set-Cookie"))
    return m.group(1)


@pytest.fixture
def admin_relay(make_relay):
    inst = make_relay(start=False, config={"admin": {"listen": "127.0.0.1:0", "login_failures": 3}})
    inst.cli("domain", "add", "example.com", "--no-dkim", check=True)
    inst.cli("admin", "add", "boss", "--password-stdin", input=ADMIN_PW + "\n", check=True)
    return inst.start()


def test_admin_accounts_come_from_the_cli_and_passwd_ends_their_sessions(admin_relay):
    inst = admin_relay
    port = inst.ports["admin"]
    cp = inst.cli("admin", "list", "--json", check=True)
    assert [u["username"] for u in json.loads(cp.stdout)] == ["boss"]
    # No default password, no empty one, no weak one; names are checked.
    assert inst.cli("admin", "add", "other", "--password-stdin", input="\n").returncode == 2
    assert inst.cli("admin", "add", "other", "--password-stdin", input="short\n").returncode == 1
    bad = inst.cli("admin", "add", "bad name", "--password-stdin", input=ADMIN_PW + "\n")
    assert bad.returncode == 2 and bad.stderr.startswith("relay: admin name")
    dup = inst.cli("admin", "add", "boss", "--password-stdin", input=ADMIN_PW + "\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    cookie = login(port)
    assert cookie and get(port, "/settings", cookie).status == 200
    cp = inst.cli("admin", "passwd", "boss", "--password-stdin", input="a brand new password\n", check=True)
    assert "1 session(s) ended" in cp.stdout
    assert get(port, "/settings", cookie).status == 303  # back to the login page
    assert login(port) is None and login(port, password="a brand new password")
    inst.cli("admin", "remove", "boss", check=True)
    assert "relay admin add NAME" in get(port, "/login").body  # no admin: only the how-to page
    assert inst.cli("admin", "remove", "boss").returncode == 1


def test_sigterm_stops_the_admin_listener(admin_relay):
    port = admin_relay.ports["admin"]
    assert get(port, "/login").status == 200
    assert admin_relay.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_non_loopback_plain_http_admin_is_refused_at_start(tmp_path):
    inst = RelayInstance(tmp_path, config={"admin": {"listen": "0.0.0.0:0"}})
    cp = inst.cli("serve")
    assert cp.returncode == 2
    assert cp.stderr.count("\n") == 1 and "admin.listen" in cp.stderr and "loopback" in cp.stderr


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_fail2ban_filter_matches_failed_admin_logins_and_only_the_client_address(make_relay, fmt):
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        tools.missing("fail2ban-regex not installed (.ci/run installs the fail2ban package)")
    inst = make_relay(start=False, config={"admin": {"listen": "127.0.0.1:0", "login_failures": 3},
                                           "logging": {"format": fmt}})
    inst.cli("domain", "add", "example.com", "--no-dkim", check=True)
    inst.cli("admin", "add", "boss", "--password-stdin", input=ADMIN_PW + "\n", check=True)
    inst.start()
    port = inst.ports["admin"]
    for _ in range(3):
        assert post(port, "/login", {"username": "boss", "password": "wrong"}, source="127.0.9.1").status == 401
    # Locked out now: refused without a password check, and not a failure line.
    assert post(port, "/login", {"username": "boss", "password": ADMIN_PW}, source="127.0.9.1").status == 429
    evil = 'x" ip=10.6.6.6 user="y'
    assert post(port, "/login", {"username": evil, "password": "wrong"}, source="127.0.9.2").status == 401
    # The name is locked from every address now (per-name budget), the right password too.
    assert post(port, "/login", {"username": "boss", "password": ADMIN_PW}, source="127.0.9.3").status == 429
    assert inst.wait_event("admin_auth_failed", count=4)
    # The HTTP API's refused bearer tokens are the same kind of guess, from their own address.
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=("127.0.9.4", 0))
        conn.request("GET", "/api/v1/domains", headers={"Authorization": "Bearer rk_nope_guess"})
        assert conn.getresponse().status == 401
        conn.close()
    assert inst.wait_event("api_auth_failed", count=2)
    inst.stop()
    log = inst.dir / f"admin.{fmt}.log"
    log.write_text("\n".join(inst.raw_log) + "\n")
    out = subprocess.run([tool, "-o", "ip", str(log), str(FILTER)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["127.0.9.1"] * 3 + ["127.0.9.2"] + ["127.0.9.4"] * 2, out.stdout


def test_admin_jail_bans_above_the_admins_own_lockout():
    import configparser
    jail = configparser.ConfigParser()
    jail.read(JAIL)
    assert jail["relay-admin"]["filter"] == "relay-admin"
    from relay.config import AdminConfig
    assert int(jail["relay-admin"]["maxretry"]) > AdminConfig().login_failures


def test_admin_over_tls_takes_the_renewed_certificate_at_sighup(make_relay):
    import ssl

    from relay import tls
    inst = make_relay(start=False, config={"admin": {"listen": "127.0.0.1:0", "tls": True}})
    inst.cli("admin", "add", "boss", "--password-stdin", input=ADMIN_PW + "\n", check=True)
    inst.start()
    port = inst.ports["admin"]

    def peer_cert() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
        conn.request("GET", "/login")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Strict-Transport-Security")
        r.read()
        der = conn.sock.getpeercert(binary_form=True)
        conn.close()
        return der

    first = peer_cert()
    tls.write_self_signed(inst.config["tls"]["cert"], inst.config["tls"]["key"], "renewed.test")
    inst.signal(__import__("signal").SIGHUP)
    assert inst.wait_event("reloaded")
    assert peer_cert() != first
    with pytest.raises(ConnectionError):  # plain HTTP is not spoken there
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/login")
        conn.getresponse()


def test_the_api_is_mounted_under_api_v1_with_its_own_bearer_auth(make_relay):
    """No cookie, no Sec-Fetch-Site, no Origin, no form token: the API's bearer key is its auth,
    and the admin's session middleware (or its no-admin page) never answers for it."""
    inst = make_relay(start=False, config={"admin": {"listen": "127.0.0.1:0"}})
    inst.cli("domain", "add", "example.com", "--no-dkim", check=True)
    token = json.loads(inst.cli("admin", "api-key", "add", "bot", "--scope", "write", "--json",
                                check=True).stdout)["token"]
    inst.start()  # and no admin account at all
    port = inst.ports["admin"]

    def call(method: str, path: str, body: dict | None = None, auth: str | None = token):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r, json.loads(data) if data else None

    r, doc = call("GET", "/api/v1/openapi.json")
    assert r.status == 200 and doc["openapi"].startswith("3.1")
    r, body = call("POST", "/api/v1/domains/example.com/credentials", {"login": "app@example.com"})
    assert r.status == 201 and body["password"]
    assert r.getheader("Content-Security-Policy") and r.getheader("Cache-Control") == "no-store"
    r, body = call("GET", "/api/v1/domains", auth=None)
    assert r.status == 401 and r.getheader("Location") is None
    assert "relay admin add NAME" in get(port, "/login").body  # the pages still want an admin
