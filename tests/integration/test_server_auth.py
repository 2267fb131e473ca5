"""Listeners, TLS, EHLO and AUTH over real sockets against the real relay process.

One relay serves the module (lockout off: every failure test would otherwise lock 127.0.0.1);
lockout, trusted networks and CLI changes get relays of their own.
"""
from __future__ import annotations

import socket
import ssl
import statistics
import threading
import time
import warnings

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import RawSMTP, authed, b64, connect, metric, start_relay
from tests.support.relay_instance import client_tls_context

SIZE = 1_000_000
PLAIN_OK = b64(f"\0{USER}\0{PASSWORD}")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("auth"),
                       config={"limits": {"auth_failures": 10_000, "message_size": SIZE}})
    yield inst
    inst.stop()


# ---------------------------------------------------------------- listeners and EHLO

def ehlo_keywords(r) -> set[str]:
    return set(r.lines[1:])


def test_banner_and_ehlo_before_tls_offer_starttls_not_auth(relay):
    with connect(relay) as c:
        assert c.banner.code == 220 and c.banner.text == f"relay.test {replies.BANNER}"
        r = c.ehlo()
        assert r.lines[0] == "relay.test"
        assert ehlo_keywords(r) == {"PIPELINING", f"SIZE {SIZE}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                                    "DSN", "STARTTLS"}


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_ehlo_after_tls_offers_auth_not_starttls(relay, implicit):
    with connect(relay, implicit=implicit) as c:
        assert c.banner.text.startswith("relay.test ")
        r = c.secure().cmd("EHLO client.test")
        assert r.lines[0] == "relay.test"
        kw = ehlo_keywords(r)
        assert "STARTTLS" not in kw
        auth = [k for k in kw if k.startswith("AUTH ")]
        assert len(auth) == 1 and set(auth[0].split()[1:]) == {"PLAIN", "LOGIN"}
        assert {"PIPELINING", f"SIZE {SIZE}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"} <= kw


def test_implicit_port_speaks_tls_from_the_first_byte(relay):
    # A plain-text client gets no SMTP banner: the server waits for a ClientHello.
    with socket.create_connection(("127.0.0.1", relay.ports["implicit"]), timeout=2) as s:
        s.sendall(b"EHLO client.test\r\n")
        try:
            data = s.recv(100)
        except (TimeoutError, ConnectionError):
            data = b""
        assert not data.startswith(b"220")
    with connect(relay, implicit=True) as c:
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_starttls_then_tls_already_active(relay):
    with connect(relay) as c:
        c.secure()
        assert c.cmd("STARTTLS").is_(replies.TLS_ALREADY)
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_plaintext_pipelined_after_starttls_is_discarded(relay):
    """RFC 3207 4.2 / CVE-2011-0411: commands injected after STARTTLS in clear text never run inside TLS."""
    with connect(relay) as c:
        c.ehlo()
        c.send("STARTTLS\r\nEHLO injected.test\r\nMAIL FROM:<app@mg.example.com>\r\n")
        assert c.read().is_(replies.READY_TLS)
        c.sock = client_tls_context().wrap_socket(c.sock)
        r = c.cmd("NOOP")
        assert r.is_(replies.NOOP_OK), r  # not the injected EHLO's or MAIL's reply
        assert c.cmd(f"MAIL FROM:<{USER}>").is_(replies.NEED_EHLO)  # the injected EHLO did not count


def test_auth_and_mail_refused_before_starttls(relay):
    with connect(relay) as c:
        c.ehlo()
        r = c.cmd("AUTH PLAIN " + PLAIN_OK)
        assert r.code == 530 and r.text == "5.7.0 Must issue a STARTTLS command first"
        r = c.cmd(f"MAIL FROM:<{USER}>")
        assert r.code == 530 and r.text == "5.7.0 Must issue a STARTTLS command first"
        assert c.cmd(f"RCPT TO:<bob@example.net>").code == 530


def _tls11_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def _client_can_speak_tls11(tmp_path) -> bool:
    """Control: this client completes TLS 1.1 against a server that allows it (else the test proves nothing)."""
    from tests.support.mx_sink import make_test_cert_files
    cert, key = make_test_cert_files(str(tmp_path))
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        srv.set_ciphers("DEFAULT:@SECLEVEL=0")
        srv.minimum_version = ssl.TLSVersion.TLSv1
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = ls.accept()
        try:
            srv.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with _tls11_client().wrap_socket(socket.create_connection(ls.getsockname(), timeout=5)) as s:
            return s.version() == "TLSv1.1"
    except (ssl.SSLError, OSError):
        return False
    finally:
        t.join(5)
        ls.close()


def test_tls_1_1_client_is_refused_on_both_ports(relay, tmp_path):
    if not _client_can_speak_tls11(tmp_path):
        pytest.skip("this OpenSSL build cannot speak TLS 1.1 even at SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        RawSMTP(relay.ports["implicit"], implicit=True, context=_tls11_client())
    with connect(relay) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _tls11_client().wrap_socket(c.sock)
    # TLS 1.2 exactly is fine.
    ctx = client_tls_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c = RawSMTP(relay.ports["implicit"], implicit=True, context=ctx)
    assert c.sock.version() == "TLSv1.2"
    assert c.ehlo().code == 250
    c.close()


# ---------------------------------------------------------------- AUTH PLAIN / LOGIN

@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_auth_plain_initial_response(relay, implicit):
    with connect(relay, implicit=implicit) as c:
        assert c.secure().auth_plain().is_(replies.AUTH_OK)
        assert c.cmd(f"MAIL FROM:<{USER}>").is_(replies.SENDER_OK)


def test_auth_plain_without_initial_response(relay):
    with connect(relay).secure() as c:
        r = c.cmd("AUTH PLAIN")
        assert r.code == 334 and r.text == ""
        assert c.cmd(b64(f"\0{USER}\0{PASSWORD}")).is_(replies.AUTH_OK)


def test_auth_plain_authzid_equal_to_authcid_is_accepted(relay):
    with connect(relay).secure() as c:
        assert c.auth_plain(authz=USER).is_(replies.AUTH_OK)


def test_auth_plain_other_authzid_is_refused(relay):
    with connect(relay).secure() as c:
        assert c.auth_plain(authz="boss@mg.example.com").is_(replies.AUTH_INVALID)
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 530


def test_auth_login_without_initial_response(relay):
    with connect(relay).secure() as c:
        r = c.cmd("AUTH LOGIN")
        assert r.code == 334 and r.text == b64("Username:")
        r = c.cmd(b64(USER))
        assert r.code == 334 and r.text == b64("Password:")
        assert c.cmd(b64(PASSWORD)).is_(replies.AUTH_OK)


def test_auth_login_with_initial_response(relay):
    with connect(relay).secure() as c:
        r = c.cmd(f"AUTH LOGIN {b64(USER)}")
        assert r.code == 334 and r.text == b64("Password:")
        assert c.cmd(b64(PASSWORD)).is_(replies.AUTH_OK)


def test_auth_mechanism_is_case_insensitive(relay):
    with connect(relay).secure() as c:
        assert c.cmd("auth plain " + PLAIN_OK).is_(replies.AUTH_OK)


def test_unknown_mechanism(relay):
    with connect(relay).secure() as c:
        assert c.cmd("AUTH CRAM-MD5").is_(replies.AUTH_MECH_UNKNOWN)
        assert c.auth_plain().is_(replies.AUTH_OK)


def _time_failure(relay, user: str, password: str) -> tuple[float, str]:
    with connect(relay).secure() as c:
        t0 = time.perf_counter()
        r = c.auth_plain(user, password)
        return time.perf_counter() - t0, str(r)


def test_wrong_password_and_unknown_user_look_the_same(make_relay):
    # No failure delay and a real argon2 cost: the time is the verification itself, so an unknown
    # user answered without hashing would stand out (a user-enumeration oracle).
    inst = make_relay(start=False, config={
        "limits": {"auth_failure_delay": 0, "auth_failures": 1000},
        "credentials": {"argon2_time_cost": 2, "argon2_memory_cost": 32768, "argon2_parallelism": 1}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    _time_failure(inst, USER, "warm up the connection path")
    wrong = [_time_failure(inst, USER, "not the password at all") for _ in range(5)]
    unknown = [_time_failure(inst, "nobody@mg.example.com", PASSWORD) for _ in range(5)]
    other_domain = [_time_failure(inst, "x@unknown.example", PASSWORD) for _ in range(5)]
    not_an_address = [_time_failure(inst, "garbage", PASSWORD) for _ in range(5)]
    expected = str(replies.AUTH_INVALID)
    assert {r for _, r in wrong + unknown + other_domain + not_an_address} == {expected}
    tw, tu, to, tg = (statistics.median(t for t, _ in x) for x in (wrong, unknown, other_domain, not_an_address))
    assert tw > 0.005, "argon2 too cheap here for the comparison to mean anything"
    for t in (tu, to, tg):
        assert 0.5 < t / tw < 2, (tw, tu, to, tg)


def test_auth_failure_is_logged_for_fail2ban_without_the_password(relay):
    secret = "Pa55word-that-must-not-leak"
    with connect(relay, source="127.0.0.9").secure() as c:
        assert c.auth_plain(USER, secret).is_(replies.AUTH_INVALID)
    assert relay.wait_event("auth", result="failure", client="127.0.0.9")
    assert not any(secret in line or b64(f"\0{USER}\0{secret}") in line for line in relay.raw_log)


def test_auth_before_ehlo(relay):
    with connect(relay, implicit=True) as c:
        assert c.auth_plain().is_(replies.AUTH_NEED_EHLO)
    with connect(relay) as c:
        c.ehlo()
        c.starttls()
        # RFC 3207 4.2: the EHLO before STARTTLS is forgotten.
        assert c.auth_plain().code == 503
        c.ehlo()
        assert c.auth_plain().is_(replies.AUTH_OK)


def test_auth_after_helo_is_refused(relay):
    with connect(relay, implicit=True) as c:
        assert c.cmd("HELO client.test").code == 250
        assert c.auth_plain().code == 503


def test_second_auth_and_auth_after_mail(relay):
    with authed(relay) as c:
        r = c.auth_plain()
        assert r.code == 503 and r.lines[-1].startswith("5.5.1")
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        r = c.auth_plain()
        assert r.code == 503 and r.lines[-1].startswith("5.5.1")


@pytest.mark.parametrize("dialogue", [
    ["AUTH PLAIN", "*"],
    ["AUTH LOGIN", "*"],
    ["AUTH LOGIN", b64(USER), "*"],
    [f"AUTH LOGIN {b64(USER)}", "*"],
    ["AUTH PLAIN *"],
], ids=["plain", "login-user", "login-password", "login-ir", "plain-ir"])
def test_auth_abort(relay, dialogue):
    with connect(relay).secure() as c:
        for line in dialogue[:-1]:
            assert c.cmd(line).code == 334
        r = c.cmd(dialogue[-1])
        assert r.is_(replies.AUTH_ABORTED)
        assert c.auth_plain().is_(replies.AUTH_OK)


@pytest.mark.parametrize("dialogue", [
    ["AUTH PLAIN not*base64"],
    ["AUTH PLAIN", "not*base64"],
    ["AUTH PLAIN", "AGFw"[:3]],  # truncated (no padding)
    ["AUTH LOGIN", "%%%"],
    ["AUTH LOGIN", b64(USER), "@@@@"],
    ["AUTH LOGIN !!!!"],
], ids=["plain-ir", "plain", "plain-truncated", "login-user", "login-password", "login-ir"])
def test_auth_bad_base64(relay, dialogue):
    with connect(relay).secure() as c:
        for line in dialogue[:-1]:
            assert c.cmd(line).code == 334
        r = c.cmd(dialogue[-1])
        assert r.is_(replies.AUTH_BAD_BASE64)
        assert c.auth_plain().is_(replies.AUTH_OK)


@pytest.mark.parametrize("blob", [
    f"{USER}\0{PASSWORD}",
    f"\0\0{USER}\0{PASSWORD}",
    f"\0{USER}\0{PASSWORD}\0",
    f"{PASSWORD}",
    f"\0\0{PASSWORD}",
], ids=["two-fields", "four-fields", "trailing-nul", "one-field", "empty-authcid"])
def test_auth_plain_wrong_field_count(relay, blob):
    with connect(relay).secure() as c:
        assert c.cmd(f"AUTH PLAIN {b64(blob)}").is_(replies.AUTH_INVALID)


def test_auth_syntax_errors(relay):
    with connect(relay).secure() as c:
        assert c.cmd("AUTH").is_(replies.AUTH_BAD_SYNTAX)
        assert c.cmd("AUTH PLAIN a b").is_(replies.AUTH_BAD_SYNTAX)


def test_overlong_auth_response_line_then_session_still_usable(relay):
    with connect(relay).secure() as c:
        assert c.cmd("AUTH PLAIN").code == 334
        r = c.cmd("A" * 20_000)
        assert 500 <= r.code < 600, r
        assert c.cmd("NOOP").code == 250
        assert c.auth_plain().is_(replies.AUTH_OK)
    with connect(relay).secure() as c:
        r = c.cmd("AUTH PLAIN " + "A" * 20_000)
        assert 500 <= r.code < 600, r
        assert c.auth_plain().is_(replies.AUTH_OK)


def test_long_but_legal_plain_response_is_accepted(relay, tmp_path):
    """RFC 4954 4: AUTH responses may be up to 12288 octets; a 900-character password is legitimate."""
    user, password = "long@mg.example.com", "Lp-" + "x1y2z3" * 150
    relay.add_user(user, password)
    blob = b64(f"{user}\0{user}\0{password}")
    assert len(f"AUTH PLAIN {blob}") > 1001
    with connect(relay).secure() as c:
        assert c.cmd(f"AUTH PLAIN {blob}").is_(replies.AUTH_OK)
    with connect(relay).secure() as c:
        assert c.cmd("AUTH PLAIN").code == 334
        assert c.cmd(blob).is_(replies.AUTH_OK)


# ---------------------------------------------------------------- lockout

def test_lockout_after_failures_then_expiry(make_relay):
    inst = make_relay(start=False, config={"limits": {"auth_failures": 3, "auth_failure_window": 60,
                                                      "auth_lockout": 2}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    ip = "127.0.0.5"
    assert metric(inst, "relay_auth_lockouts_total") == 0
    with connect(inst, source=ip).secure() as c:
        for _ in range(3):
            assert c.auth_plain(USER, "wrong password here").is_(replies.AUTH_INVALID)
        # Locked: even the right password is refused, before any verification.
        assert c.auth_plain().is_(replies.AUTH_LOCKED_USER)
    with connect(inst, source=ip).secure() as c:
        assert c.auth_plain().is_(replies.AUTH_LOCKED_USER)
    t_locked = time.monotonic()
    assert metric(inst, "relay_auth_lockouts_total") == 1
    assert inst.wait_event("auth_lockout", client=ip)
    # Another address is not affected.
    with connect(inst, source="127.0.0.6").secure() as c:
        assert c.auth_plain().is_(replies.AUTH_OK)
    # Measuring the lockout itself: it ends after limits.auth_lockout seconds.
    time.sleep(max(0.0, 2.2 - (time.monotonic() - t_locked)))
    with connect(inst, source=ip).secure() as c:
        assert c.auth_plain().is_(replies.AUTH_OK)
    assert metric(inst, "relay_auth_lockouts_total") == 1


def test_a_good_login_does_not_reset_the_failure_count(make_relay):
    """Failures within the window count even with successes between them: otherwise anyone holding one
    credential could guess another's password without limit by logging in as themselves every few tries."""
    inst = make_relay(start=False, config={"limits": {"auth_failures": 3, "auth_lockout": 600}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    with connect(inst).secure() as c:
        assert c.auth_plain("victim@mg.example.com", "guess one").is_(replies.AUTH_INVALID)
        assert c.auth_plain("victim@mg.example.com", "guess two").is_(replies.AUTH_INVALID)
    with connect(inst).secure() as c:
        assert c.auth_plain().is_(replies.AUTH_OK)
    with connect(inst).secure() as c:
        assert c.auth_plain("victim@mg.example.com", "guess three").is_(replies.AUTH_INVALID)
        assert c.auth_plain("victim@mg.example.com", "guess four").is_(replies.AUTH_LOCKED_USER)
        # The lockout is of (network, victim): the guesser's own credential still works.
        assert c.auth_plain().is_(replies.AUTH_OK)
    assert metric(inst, "relay_auth_lockouts_total") == 1


def test_parallel_guesses_cannot_outrun_the_lockout(make_relay):
    """The failure delay must not open a window where many connections guess at once before any failure
    is counted: at most limits.auth_failures guesses get a 535, the rest 454."""
    inst = make_relay(start=False, config={"limits": {"auth_failures": 3, "auth_lockout": 600,
                                                      "auth_failure_delay": 0.5, "connections_per_ip": 20}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    conns = [connect(inst, source="127.0.0.7").secure() for _ in range(8)]
    try:
        for i, c in enumerate(conns):  # all sent before any reply can come back
            c.send("AUTH PLAIN " + b64(f"\0{USER}\0wrong guess {i}") + "\r\n")
        got = [c.read() for c in conns]
    finally:
        for c in conns:
            c.close()
    assert sum(r.is_(replies.AUTH_INVALID) for r in got) <= 3, [str(r) for r in got]
    assert all(r.is_(replies.AUTH_INVALID) or r.is_(replies.AUTH_LOCKED_USER) for r in got)
    with connect(inst, source="127.0.0.7").secure() as c:
        assert c.auth_plain().is_(replies.AUTH_LOCKED_USER)


# ---------------------------------------------------------------- CLI changes apply at the next AUTH

def test_password_reset_and_delete_apply_at_next_auth(make_relay):
    inst = make_relay(start=False, config={"credentials": {"verify_cache_ttl": 3600}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    for _ in range(2):  # the second login is served from the verify cache
        with connect(inst).secure() as c:
            assert c.auth_plain().is_(replies.AUTH_OK)
    new = "a brand new password 42"
    inst.cli("user", "reset-password", USER, "--password-stdin", input=new + "\n", check=True)
    with connect(inst).secure() as c:
        assert c.auth_plain(USER, PASSWORD).is_(replies.AUTH_INVALID)
        assert c.auth_plain(USER, new).is_(replies.AUTH_OK)
    with connect(inst).secure() as c:
        assert c.auth_plain(USER, new).is_(replies.AUTH_OK)  # cached again
    inst.cli("user", "delete", USER, check=True)
    with connect(inst).secure() as c:
        assert c.auth_plain(USER, new).is_(replies.AUTH_INVALID)
    # Re-created with the old password: the old cache entry must not resurrect the deleted one's password.
    inst.add_user(USER, PASSWORD)
    with connect(inst).secure() as c:
        assert c.auth_plain(USER, new).is_(replies.AUTH_INVALID)
        assert c.auth_plain(USER, PASSWORD).is_(replies.AUTH_OK)


# ---------------------------------------------------------------- no open relay

@pytest.mark.parametrize("port", ["starttls", "implicit"])
def test_unauthenticated_mail_is_refused_on_every_port(relay, port):
    with connect(relay, implicit=port == "implicit").secure() as c:
        for sender in (USER, "someone@example.org", ""):
            r = c.cmd(f"MAIL FROM:<{sender}>")
            assert r.is_(replies.AUTH_REQUIRED), r
        assert c.cmd("RCPT TO:<victim@example.org>").code == 530
        assert c.cmd("DATA").code == 530
    assert not relay.queued()


def test_unauthenticated_pipelined_transaction_is_refused(relay):
    with connect(relay).secure() as c:
        c.send("MAIL FROM:<spammer@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
               "Subject: spam\r\n\r\nbuy\r\n.\r\nQUIT\r\n")
        assert c.read().code == 530
        assert c.read().code == 530
        assert c.read().code == 530
        # The would-be message lines are commands now and get errors, never a 250 "queued".
        rest = []
        while True:
            try:
                rest.append(c.read())
            except EOFError:
                break
        assert all(r.code != 250 or "queued" not in r.text for r in rest)
    assert not relay.queued()


# ---------------------------------------------------------------- trusted networks

@pytest.fixture(scope="module")
def trusted_relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("trusted"), config={
        "trusted_networks": [{"network": "127.0.0.0/30", "domains": ["mg.example.com"]}]})
    yield inst
    inst.stop()


def test_trusted_network_sends_without_auth_for_its_domains(trusted_relay):
    inst = trusted_relay
    before = metric(inst, "relay_trusted_sessions_total")
    with connect(inst, source="127.0.0.2") as c:
        c.ehlo()  # no TLS, no AUTH: the network is the credential
        assert c.cmd("MAIL FROM:<app@mg.example.com>").is_(replies.SENDER_OK)
        assert c.cmd("RCPT TO:<bob@example.net>").is_(replies.RCPT_OK)
        assert c.cmd("DATA").code == 354
        r = c.cmd("Subject: trusted\r\n\r\nhello\r\n.")
        assert r.code == 250, r
        qid = r.text.rsplit(" ", 1)[-1]
        assert c.cmd("MAIL FROM:<x@sub.mg.example.com>").is_(replies.SENDER_OK)
        assert c.cmd("RSET").code == 250
        assert c.cmd("MAIL FROM:<app@other.example.com>").is_(replies.SENDER_NOT_TRUSTED)
        assert c.cmd("MAIL FROM:<app@evilmg.example.com>").code == 553
        assert c.cmd("MAIL FROM:<>").code == 553
    assert [m["id"] for m in inst.queued()] == [qid]
    assert f"by relay.test (relay) with ESMTP id {qid}".encode() in inst.body(qid)  # no A: not authenticated
    with inst.db() as conn:
        assert conn.execute("SELECT auth_user, client_ip FROM messages WHERE id=?", (qid,)).fetchone()[:] == \
            ("trusted:127.0.0.0/30", "127.0.0.2")
    assert inst.wait_event("trusted_session", client="127.0.0.2")
    assert metric(inst, "relay_trusted_sessions_total") == before + 2


def test_a_client_naming_us_in_ehlo_is_never_trusted(trusted_relay):
    """Our own outbound side come back (a loop through a forwarder or NAT) says EHLO with our
    name: inside a trusted network or not, it must authenticate like anyone else."""
    with connect(trusted_relay, source="127.0.0.2") as c:
        c.ehlo("relay.test")
        assert c.cmd("MAIL FROM:<app@mg.example.com>").code == 530
        c.cmd("RSET")
        c.ehlo("app-server.internal")
        assert c.cmd("MAIL FROM:<app@mg.example.com>").is_(replies.SENDER_OK)


def test_outside_the_trusted_network_auth_is_still_required(trusted_relay):
    with connect(trusted_relay, source="127.0.0.9") as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<app@mg.example.com>").code == 530
        c.starttls()
        c.ehlo()
        assert c.cmd("MAIL FROM:<app@mg.example.com>").is_(replies.AUTH_REQUIRED)


def test_trusted_client_may_still_authenticate_and_then_auth_rules_apply(trusted_relay):
    with connect(trusted_relay, source="127.0.0.1").secure() as c:
        assert c.cmd("MAIL FROM:<app@mg.example.com>").code == 250
        # AUTH inside a transaction is a sequence error.
        assert c.auth_plain().is_(replies.AUTH_IN_TRANSACTION)
        assert c.cmd("RSET").code == 250
        assert c.auth_plain().is_(replies.AUTH_OK)
        assert c.cmd("MAIL FROM:<app@mg.example.com>").is_(replies.SENDER_OK)


def test_parallel_correct_logins_from_one_address_all_succeed(make_relay):
    """An app's connection pool logging in at once is not an attack: more parallel logins than
    limits.auth_failures must all get 235, none 454."""
    inst = make_relay(start=False, config={"limits": {"auth_failures": 3, "connections_per_ip": 20},
                                           "credentials": {"verify_cache_ttl": 1}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    conns = [connect(inst, source="127.0.0.8").secure() for _ in range(10)]
    try:
        for c in conns:
            c.send("AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}") + "\r\n")
        got = [c.read() for c in conns]
    finally:
        for c in conns:
            c.close()
    assert all(r.is_(replies.AUTH_OK) for r in got), [str(r) for r in got]
