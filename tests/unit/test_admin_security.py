"""relay.admin middleware: security headers, the cross-site checks (Sec-Fetch-Site, Origin, the
form token), sessions (cookie attributes, hashes, timeouts, revocation), the login limit and
X-Forwarded-For from trusted proxies only. The real app on a real socket (aiohttp's TestServer)
over a temporary database; no browser here (tests/browser/ has that)."""
from __future__ import annotations

import hashlib
import logging
import re

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from relay import config, db
from relay.admin import proxies, security
from relay.admin.app import make_app
from relay.admin.ratelimit import LoginLimiter
from relay.admin.server import build_deps
from relay.admin.sessions import COOKIE, SessionStore, token_hash
from relay.store.writer import GroupWriter
from tests.support.relay_instance import FAST_ARGON2

NAME, PASSWORD = "boss", "a long admin password"
SAME = {"Sec-Fetch-Site": "same-origin"}


class Admin:
    """The admin app on a loopback port, and a client that keeps the session cookie by hand
    (aiohttp's jar will not send a Secure cookie over http; Chromium does, on loopback)."""

    def __init__(self, tmp_path, admin: dict | None = None, ops: bool = False):
        self.path = str(tmp_path / "relay.db")
        self.cfg = config.from_dict({"storage": {"path": self.path}, "credentials": dict(FAST_ARGON2),
                                     "tls": {"cert": str(tmp_path / "c.crt"), "key": str(tmp_path / "c.key")},
                                     "admin": {"listen": "127.0.0.1:0", **(admin or {})}})
        self.cookie: str | None = None
        self.with_ops = ops
        self.stores = None

    async def __aenter__(self) -> "Admin":
        self.conn = await db.open_async(self.path)
        ops = None
        if self.with_ops:
            from relay.operations import Operations
            from relay.store.factory import open_stores
            self.stores = await open_stores(self.cfg, role="serve")
            self.writer = self.stores.writer
            ops = Operations(self.stores, self.cfg)
        else:
            self.writer = GroupWriter(self.path)
        self.deps = build_deps(self.cfg, self.conn, self.writer, None, [(587, "starttls"), (465, "implicit")], ops)
        self.server = TestServer(make_app(self.deps), host="127.0.0.1")
        await self.server.start_server()
        self.http = ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.close()
        await self.server.close()
        if self.stores is not None:
            await self.stores.close()
        else:
            await self.writer.close()
        await self.conn.close()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def req(self, method: str, path: str, data: dict | None = None, headers: dict | None = None,
                  cookie: str | None = None):
        h = dict(headers or {})
        token = cookie if cookie is not None else self.cookie
        if token:
            h["Cookie"] = f"{COOKIE}={token}"
        async with self.http.request(method, self.url(path), data=data, headers=h, allow_redirects=False) as r:
            r.body = await r.text()
            return r

    async def login(self, name: str = NAME, password: str = PASSWORD, headers: dict | None = None):
        r = await self.req("POST", "/login", {"username": name, "password": password}, headers or SAME)
        if r.status == 303:
            self.cookie = r.cookies[COOKIE].value
        return r

    async def csrf(self) -> str:
        page = await self.req("GET", "/sessions")
        return re.search(r'name="csrf" value="([0-9a-f]+)"', page.body).group(1)


@pytest.fixture
async def admin(tmp_path):
    async with Admin(tmp_path) as a:
        await a.deps.accounts.add(NAME, PASSWORD)
        yield a


async def test_every_response_carries_the_security_headers_and_pages_are_not_cached(admin):
    for path in ("/login", "/settings", "/no-such-page"):
        r = await admin.req("GET", path)
        assert r.headers["Content-Security-Policy"] == security.CSP, path
        assert "'unsafe-inline'" not in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert r.headers["Cross-Origin-Resource-Policy"] == "same-origin"
        assert "camera=()" in r.headers["Permissions-Policy"]
        assert r.headers["Cache-Control"] == "no-store"
        assert "Strict-Transport-Security" not in r.headers  # plain HTTP here: the proxy sets HSTS
        assert r.headers["Server"] == "relay"
    css = re.search(r'href="(/static/admin.css[^"]*)"', (await admin.req("GET", "/login")).body).group(1)
    r = await admin.req("GET", css)
    assert r.status == 200 and r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers.get("Cache-Control") != "no-store"
    # No inline script or style anywhere: the CSP would block them, so none may be needed.
    page = (await admin.req("GET", "/login")).body
    assert "<script" not in page and "style=" not in page and "<style" not in page


async def test_without_an_admin_account_only_the_how_to_page_is_served(tmp_path):
    async with Admin(tmp_path) as a:
        for path in ("/", "/login", "/settings"):
            r = await a.req("GET", path)
            assert r.status == 503 and "relay admin add NAME" in r.body, path
        r = await a.req("POST", "/login", {"username": "x", "password": "y"}, SAME)
        assert r.status == 503


async def test_login_cookie_is_host_prefixed_secure_httponly_strict_and_only_its_hash_is_stored(admin):
    r = await admin.login()
    assert r.status == 303 and r.headers["Location"] == "/"
    raw = r.headers["Set-Cookie"]
    assert raw.startswith(f"{COOKIE}=")
    for attr in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attr in raw, raw
    assert "Domain=" not in raw  # __Host- forbids it
    token = admin.cookie
    assert len(token) >= 43
    rows = await admin.conn.execute_fetchall("SELECT token_hash FROM admin_sessions")
    assert [row["token_hash"] for row in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert (await admin.req("GET", "/settings")).status == 200
    # A new id at every login, and the one the browser brought is gone (no fixation).
    await admin.login()
    assert admin.cookie != token
    assert (await admin.req("GET", "/settings", cookie=token)).status == 303


async def test_unauthenticated_requests_are_sent_to_login_or_refused(admin):
    r = await admin.req("GET", "/sessions")
    assert r.status == 303 and r.headers["Location"] == "/login"
    r = await admin.req("POST", "/logout", {"csrf": "x"}, SAME)
    assert r.status == 403


@pytest.mark.parametrize("headers, allowed", [
    ({"Sec-Fetch-Site": "same-origin"}, True),
    ({"Sec-Fetch-Site": "none"}, True),
    ({"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.2:8000"}, False),
    ({"Sec-Fetch-Site": "same-site"}, False),
    ({"Origin": "http://evil.test"}, False),
    ({}, False),  # neither header: a state change must prove where it comes from
])
async def test_a_state_change_needs_fetch_metadata_or_a_matching_origin(admin, headers, allowed):
    r = await admin.req("POST", "/login", {"username": NAME, "password": PASSWORD}, headers)
    assert (r.status == 303) is allowed, (r.status, r.body)
    if not allowed:
        assert r.status == 403 and "cross-site" in r.body


async def test_origin_is_checked_against_the_own_origin_or_public_origin(admin, tmp_path):
    own = admin.url("/").rstrip("/")
    r = await admin.req("POST", "/login", {"username": NAME, "password": PASSWORD}, {"Origin": own})
    assert r.status == 303
    async with Admin(tmp_path / "p", {"public_origin": "https://relay.example.com:8025"}) as b:
        await b.deps.accounts.add(NAME, PASSWORD)
        r = await b.req("POST", "/login", {"username": NAME, "password": PASSWORD}, {"Origin": own})
        assert r.status == 403
        r = await b.req("POST", "/login", {"username": NAME, "password": PASSWORD},
                        {"Origin": "https://relay.example.com:8025"})
        assert r.status == 303


def test_origin_allowed_table():
    assert security.origin_allowed("GET", {"Sec-Fetch-Site": "cross-site"}, "http://a")  # reads pass
    assert not security.origin_allowed("DELETE", {"Origin": "http://b"}, "http://a")
    assert security.origin_allowed("PUT", {"Origin": "HTTP://A/"}, "http://a")


async def test_every_state_change_of_a_session_needs_its_form_token(admin):
    await admin.login()
    token = await admin.csrf()
    assert token == security.form_token(admin.cookie)
    for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": security.form_token("another session")}):
        r = await admin.req("POST", "/logout", data, SAME)
        assert r.status == 403 and "form token" in r.body, data
    r = await admin.req("POST", "/logout", {"csrf": token}, SAME)
    assert r.status == 303 and r.headers["Location"] == "/login"
    assert (await admin.req("GET", "/sessions")).status == 303  # logged out: the row is gone
    assert not await admin.conn.execute_fetchall("SELECT 1 FROM admin_sessions")


async def test_login_failures_lock_the_name_and_address_out_and_log_the_fail2ban_line(admin, caplog):
    caplog.set_level(logging.WARNING, "relay.admin")
    for _ in range(admin.cfg.admin.login_failures):
        r = await admin.login(password="wrong password!")
        assert r.status == 401 and "Wrong admin name or password" in r.body
    r = await admin.login()  # the right password, but locked out now
    assert r.status == 429 and "Too many failed logins" in r.body
    failed = [rec for rec in caplog.records if getattr(rec, "relay_fields", {}).get("event") == "admin_auth_failed"]
    assert len(failed) == admin.cfg.admin.login_failures
    assert failed[0].relay_fields == {"event": "admin_auth_failed", "ip": "127.0.0.1", "user": NAME}


async def test_an_unknown_name_costs_one_argon2_verification_too(admin):
    calls = []
    real = admin.deps.accounts._verify_blocking

    def counting(stored, password):
        calls.append(stored)
        return real(stored, password)
    admin.deps.accounts._verify_blocking = counting
    assert (await admin.login(name="nobody")).status == 401
    assert (await admin.login(password="wrong password!")).status == 401
    assert len(calls) == 2 and all(c.startswith("$argon2id$") for c in calls)


def test_limiter_counts_per_address_and_per_name_and_the_lock_ends():
    now = [1000.0]
    lim = LoginLimiter(failures=3, window=60, lockout=300, clock=lambda: now[0])
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):  # one name from rotating addresses
        assert not lim.locked(ip, "boss")
        lim.failed(ip, "boss")
    assert lim.locked("10.0.0.9", "boss") == pytest.approx(300)
    assert lim.locked("10.0.0.9", "other") == 0
    for name in ("a", "b", "c"):  # one address spraying names
        lim.failed("10.0.0.7", name)
    assert lim.locked("10.0.0.7", "zzz") > 0
    now[0] += 301
    assert lim.locked("10.0.0.9", "boss") == 0 and lim.locked("10.0.0.7", "zzz") == 0
    # Failures older than the window do not add up.
    for _ in range(2):
        lim.failed("10.1.0.1", "slow")
        now[0] += 61
    lim.failed("10.1.0.1", "slow")
    assert lim.locked("10.1.0.1", "slow") == 0


def test_limiter_counts_an_ipv6_slash_64_as_one_address():
    lim = LoginLimiter(failures=2, window=60, lockout=300, clock=lambda: 0.0)
    lim.failed("2001:db8:1:2::1", "a")
    lim.failed("2001:db8:1:2:ffff::9", "b")
    assert lim.locked("2001:db8:1:2::77", "c") > 0
    assert lim.locked("2001:db8:1:3::1", "c") == 0


@pytest.mark.parametrize("peer, xff, expected", [
    ("127.0.0.1", ["203.0.113.9"], "203.0.113.9"),                 # our proxy says who
    ("198.51.100.1", ["203.0.113.9"], "198.51.100.1"),             # not a proxy: header ignored
    ("127.0.0.1", ["6.6.6.6, 203.0.113.9"], "203.0.113.9"),        # the client's own XFF is not believed
    ("127.0.0.1", ["6.6.6.6", "10.0.0.5, 203.0.113.9"], "203.0.113.9"),
    ("127.0.0.1", ["203.0.113.9, 10.0.0.5"], "203.0.113.9"),       # two trusted hops peeled
    ("127.0.0.1", ["not-an-ip"], "127.0.0.1"),
    ("127.0.0.1", [], "127.0.0.1"),
])
def test_client_ip_believes_x_forwarded_for_only_from_trusted_proxies(peer, xff, expected):
    nets = proxies.parse_networks(["127.0.0.0/8", "10.0.0.0/8"])
    assert proxies.client_ip(peer, xff, nets) == expected
    assert proxies.client_ip(peer, xff, ()) == peer


async def test_the_limit_and_the_log_use_the_forwarded_address_from_a_trusted_proxy(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "relay.admin")
    async with Admin(tmp_path, {"trusted_proxies": ["127.0.0.0/8"]}) as a:
        await a.deps.accounts.add(NAME, PASSWORD)
        r = await a.login(password="wrong password!", headers={**SAME, "X-Forwarded-For": "203.0.113.9"})
        assert r.status == 401
    fields = [rec.relay_fields for rec in caplog.records if hasattr(rec, "relay_fields")]
    assert {"event": "admin_auth_failed", "ip": "203.0.113.9", "user": NAME} in fields


async def test_sessions_expire_idle_and_absolute_and_a_password_change_ends_the_others(tmp_path):
    now = [10_000.0]
    path = str(tmp_path / "s.db")
    conn = await db.open_async(path)
    writer = GroupWriter(path)
    try:
        from relay.admin.accounts import AdminAccounts
        acc = AdminAccounts(conn, writer, config.CredentialsConfig(**FAST_ARGON2))
        await acc.add(NAME, PASSWORD)
        store = SessionStore(conn, writer, idle_timeout=60, absolute_timeout=150, clock=lambda: now[0])
        t = await store.create(NAME, "127.0.0.1", "test")
        for _ in range(3):  # in use every 40 s (idle limit 60): alive until the absolute limit
            now[0] += 40
            assert await store.lookup(t) is not None
        now[0] += 40  # 160 s after creation
        assert await store.lookup(t) is None
        t2 = await store.create(NAME, None, None)
        now[0] += 61
        assert await store.lookup(t2) is None  # idle
        a, b = await store.create(NAME, None, None), await store.create(NAME, None, None)
        assert await acc.set_password(NAME, "another long password", keep_session=token_hash(a)) == 1
        assert await store.lookup(a) is not None and await store.lookup(b) is None
        await acc.set_password(NAME, "a third long password")  # from the CLI: every session ends
        assert await store.lookup(a) is None
    finally:
        await writer.close()
        await conn.close()


async def test_sessions_page_lists_and_revokes_another_session(admin):
    await admin.login()
    first = admin.cookie
    await admin.login()
    # The second login replaced the first cookie's session; start a second one alongside.
    other = await admin.deps.sessions.create(NAME, "192.0.2.1", "other browser")
    page = await admin.req("GET", "/sessions")
    assert "192.0.2.1" in page.body and "(this one)" in page.body and first not in page.body
    r = await admin.req("POST", "/sessions/revoke", {"csrf": await admin.csrf(), "session": token_hash(other)}, SAME)
    assert r.status == 303
    assert await admin.deps.sessions.lookup(other) is None
    assert (await admin.req("GET", "/sessions")).status == 200


async def test_settings_panel_lists_the_listeners_and_the_pop_imap_note(admin):
    await admin.login()
    body = (await admin.req("GET", "/settings")).body
    assert "587" in body and "STARTTLS" in body and "465" in body and "Implicit TLS" in body
    assert "TLS required before AUTH" in body and "name@domain" in body
    assert "POP3/IMAP" in body and "mailbox provider" in body


# ---------------------------------------------------------------- pages on the operations layer

@pytest.fixture
async def ops_admin(tmp_path):
    async with Admin(tmp_path, ops=True) as a:
        await a.deps.accounts.add(NAME, PASSWORD)
        await a.deps.ops.add_domain(__import__("relay.operations", fromlist=["Actor"]).Actor("t", "cli"),
                                    "mg.example.com", dkim=False)
        await a.login()
        yield a


async def test_a_manual_password_is_checked_and_a_refusal_shows_no_password(ops_admin):
    a = ops_admin
    url = "/domains/mg.example.com/credentials/create"
    r = await a.req("POST", url, {"csrf": await a.csrf(), "local": "app", "mode": "manual", "password": "short"},
                    SAME)
    assert r.status == 422 and "too short" in r.body and "Password created" not in r.body
    r = await a.req("POST", url, {"csrf": await a.csrf(), "local": "app", "mode": "manual",
                                  "password": "a chosen long password"}, SAME)
    assert r.status == 201 and "a chosen long password" in r.body and r.headers["Cache-Control"] == "no-store"
    r = await a.req("POST", url, {"csrf": await a.csrf(), "local": "app"}, SAME)
    assert r.status == 409 and "already exists" in r.body
    page = await a.req("GET", "/domains/mg.example.com/credentials")
    assert "a chosen long password" not in page.body and "1 of 5" in page.body


async def test_hostile_names_are_escaped_and_unknown_things_are_a_page_not_a_traceback(ops_admin):
    a = ops_admin
    r = await a.req("POST", "/domains/mg.example.com/credentials/create",
                    {"csrf": await a.csrf(), "local": "<b>x</b>"}, SAME)
    # Accepted or refused (that is the credential store's call), it is shown as text.
    assert r.status in (201, 422) and "<b>x</b>" not in r.body and "&lt;b&gt;x&lt;/b&gt;" in r.body
    for path, status in (("/queue/NOSUCH", 404), ("/domains/nosuch.example/credentials", 404),
                         ("/queue?state=bogus", 200), ("/queue?after=garbage", 422), ("/audit?before=x", 200)):
        r = await a.req("GET", path)
        assert r.status == status, (path, r.status, r.body[:200])
        assert "Traceback" not in r.body and r.headers["Content-Security-Policy"] == security.CSP
    r = await a.req("POST", "/queue/NOSUCH/retry", {"csrf": await a.csrf(), "back": "https://evil.test/"}, SAME)
    assert r.status == 404


async def test_after_an_action_the_redirect_stays_on_our_queue_pages(ops_admin):
    from relay.admin.views.queue import _back
    assert _back({"back": "/queue?state=all"}) == "/queue?state=all"
    for evil in ("https://evil.test/", "//evil.test/queue", "/queue\\evil", "/login"):
        assert _back({"back": evil}, "Q1") == "/queue/Q1"


async def test_a_bug_in_a_page_is_a_plain_500_with_the_headers_and_one_log_line(caplog):
    # An unexpected exception must not reach aiohttp's own 500 (no CSP, no no-store) nor show
    # anything of itself to the browser.
    from aiohttp import web as aioweb

    async def broken(request):
        raise RuntimeError("secret detail")

    app = aioweb.Application(middlewares=[security.headers_middleware()])
    app.router.add_get("/boom", broken)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        import aiohttp
        async with aiohttp.ClientSession() as s, s.get(server.make_url("/boom")) as r:
            body = await r.text()
            assert r.status == 500 and r.headers["Content-Security-Policy"] == security.CSP
            assert r.headers["Cache-Control"] == "no-store" and "secret detail" not in body
    finally:
        await server.close()
    from relay import logs
    found = [getattr(rec, logs._EXTRA_KEY) for rec in caplog.records if rec.getMessage() == "admin_error"]
    assert len(found) == 1 and found[0]["error"] == "RuntimeError: secret detail" and found[0]["path"] == "/boom"


async def test_ipv4_mapped_forwarded_addresses_are_each_their_own_ipv4_budget(tmp_path):
    # A proxy on a dual-stack socket (nginx listen [::]:443 ipv6only=off) forwards IPv4 clients as
    # ::ffff:a.b.c.d. Taken as IPv6 by /64, every IPv4 client on earth was the one key ::/64: one
    # stranger's failed logins locked every IPv4 admin out.
    async with Admin(tmp_path, {"trusted_proxies": ["127.0.0.0/8"]}) as a:
        await a.deps.accounts.add(NAME, PASSWORD)
        for i in range(a.cfg.admin.login_failures):
            r = await a.login(name=f"guess{i}", password="wrong password!",
                              headers={**SAME, "X-Forwarded-For": "::ffff:203.0.113.9"})
            assert r.status == 401
        r = await a.login(headers={**SAME, "X-Forwarded-For": "::ffff:198.51.100.7"})
        assert r.status == 303, r.body
        r = await a.login(name="guess-more", password="wrong password!",
                          headers={**SAME, "X-Forwarded-For": "203.0.113.9"})
        assert r.status == 429  # the mapped and the plain form are one address


def test_limiter_keys_fold_ipv4_mapped_addresses():
    assert LoginLimiter.keys("::ffff:192.0.2.7", "x")[0] == LoginLimiter.keys("192.0.2.7", "x")[0] == "ip:192.0.2.7"


async def test_guessing_the_current_password_on_the_password_form_spends_the_login_budget(admin):
    # A session left open (or taken) must not become an unlimited password-guessing oracle:
    # the login limit counts the change form's wrong current passwords too, and once locked,
    # even the right one is refused until the lockout ends.
    assert (await admin.login()).status == 303
    csrf = await admin.csrf()
    form = {"csrf": csrf, "new": "a brand new long password", "again": "a brand new long password"}
    for _ in range(admin.cfg.admin.login_failures):
        r = await admin.req("POST", "/sessions/password", {**form, "current": "a wrong guess!!"}, SAME)
        assert r.status == 400
    r = await admin.req("POST", "/sessions/password", {**form, "current": PASSWORD}, SAME)
    assert r.status == 429, r.status
    assert await admin.deps.accounts.verify(NAME, PASSWORD)  # unchanged
