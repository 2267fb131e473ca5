"""Random valid and invalid SMTP sessions against the real relay, checked after every step.

A hypothesis RuleBasedStateMachine plays one client: EHLO/HELO with good and bad names,
STARTTLS, AUTH done right and every way wrong, MAIL/RCPT with own, foreign, routed and junk
addresses and parameters, DATA with clean, smuggling, oversize and binary bodies, RSET/NOOP/
QUIT, junk lines and pipelined bursts. One relay serves the whole run; each example opens its
own connection (on the STARTTLS or the implicit-TLS port) and reconnects when the relay closes it.

Invariants, after every step:
  * every reply is well formed and carries an enhanced status code where RFC 2034 wants one,
    and never leaks an internal error (checked by tests.support.dialog.check_reply);
  * no 451 4.3.0 "local error": with a healthy store that is always a bug in the session;
  * a 250 to MAIL, RCPT or the end of DATA only after a successful AUTH on this TLS session;
    235 only inside TLS after EHLO, and only once;
  * the queue holds exactly the messages that got a 250 to DATA (rows in the queue database);
  * the server never hangs up without saying 421 or 221 first;
  * the relay process is alive and has not logged a traceback.
"""
from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, \
    run_state_machine_as_test

from tests.conftest import PASSWORD, USER
from tests.support.dialog import ConnectionClosed, Reply, Wire
from tests.support.relay_instance import RelayInstance

MESSAGE_SIZE = 6000
MAX_ERRORS = 10  # limits.max_errors default
OWN = USER
STATS: Counter = Counter()  # what the run exercised, printed at the end
PLAIN_OK = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# ---------------------------------------------------------------- strategies

helo_names = st.one_of(st.sampled_from(["client.test", "[127.0.0.1]", "x", "", "two words", "é.test", "a" * 300]),
                       st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20))
addresses = st.one_of(
    st.sampled_from([
        f"<{OWN}>", "<APP@MG.EXAMPLE.COM>", "<other@sub.mg.example.com>", "<>", "<spammer@target.example>",
        "<bob@example.net>", "<Bob@Example.NET>", "<victim%target.example@relay.test>", "<@relay.test:v@target.example>",
        "<target.example!victim@relay.test>", '<"victim@target.example"@relay.test>', "<victim@[127.0.0.1]>",
        "<v@target.example@relay.test>", "<nobrackets", "<a@b>", "bob@example.net", "<bob@example.net", "<bö@example.net>",
        "<bob@bücher.example>", '<"quoted local"@example.net>', "<a" + "b" * 70 + "@example.net>",
        "<bob@" + "x" * 250 + ".net>", "<bob@example.net> junk", "<>>", "<<bob@example.net>>", ":<bob@example.net>",
        # Bytes that are not UTF-8 (sent raw: the strings carry them as surrogateescape).
        "<app\udcff@mg.example.com>", "<bob\udcc3@example.net>", '<"b\udcffb"@example.net>', "<bob@ex\udce4mple.net>",
    ]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x24F), max_size=40).map(lambda s: f"<{s}>"))
mail_params = st.lists(st.sampled_from([
    "SIZE=100", "SIZE=99999999", "SIZE=", "SIZE=abc", "BODY=8BITMIME", "BODY=7BIT", "BODY=BINARYMIME", "SMTPUTF8",
    "SMTPUTF8=yes", "SIZE=²", "SIZE=١٢", "RET=FULL", "RET=HDRS", "RET=NONE", "ENVID=abc+2Bdef", "ENVID=+0D+0A", "ENVID=" + "a" * 200,
    "AUTH=<>", "AUTH=app+40mg.example.com", "AUTH=", "XFOO=bar", "=x", "SIZE=1 SIZE=2"]), max_size=3).map(" ".join)
rcpt_params = st.lists(st.sampled_from([
    "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER,DELAY", "NOTIFY=", "ORCPT=rfc822;bob@example.net",
    "ORCPT=rfc822;a+0D+0Abcc", "ORCPT=bad", "XFOO=1", "NOTIFY=DELAY NOTIFY=DELAY"]), max_size=3).map(" ".join)
bodies = st.one_of(
    st.sampled_from([
        b"Subject: hi\r\n\r\nhello\r\n",
        b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<app@mg.example.com>\r\nRCPT TO:<x@example.net>\r\nDATA\r\nevil\r\n",
        b"Subject: smuggle\r\n\r\nhello\r\n.\nRSET\r\n",
        b"Subject: smuggle\r\n\r\nhello\r.\rRSET\r\n",
        b"Subject: nul\r\n\r\nhel\x00lo\r\n",
        b"Subject: dots\r\n\r\n..\r\n...\r\n. \r\n",
        b"Bcc: hidden@example.org\r\nSubject: bcc\r\n\r\nbody\r\n",
        b"Subject: long\r\n\r\n" + b"L" * 1200 + b"\r\n",
        b"Subject: big\r\n\r\n" + (b"B" * 900 + b"\r\n") * 8,
        b"".join(b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for _ in range(60)) + b"\r\nloop\r\n",
        b"",
        b"no header section at all\r\n",
        "Subject: ünïcödé\r\n\r\n日本語\r\n".encode(),
    ]),
    st.binary(max_size=2500),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"x" * 50, b"Subject: s", b": ", b"\x00", b"\xff"]),
             max_size=40).map(b"".join))
junk_lines = st.one_of(
    st.binary(max_size=1500).filter(lambda b: b"\n" not in b),
    st.sampled_from([b"XYZZY", b"HELP", b"VRFY postmaster", b"EXPN list", b"BDAT 10 LAST", b"TURN", b"ETRN x",
                     b"USER bob", b"PASS secret", b"a1 LOGIN bob pw", b"RSET now", b"NOOP x", b"STARTTLS now",
                     b"MAIL", b"RCPT", b"MAIL TO:<x@y.z>", b"RCPT FROM:<x@y.z>", b"HELO", b"EHLO", b"QUIT x",
                     b"\x00", b"", b" ", b"\t", b"GET / HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]))
# Verbs a junk line must not carry: they switch the protocol (DATA, AUTH, STARTTLS, QUIT) and have
# their own rules.
PROTOCOL_VERBS = {b"DATA", b"AUTH", b"STARTTLS", b"QUIT"}


def _verb(line: bytes) -> bytes:
    return line.strip().split(b" ", 1)[0].upper()


# ---------------------------------------------------------------- the machine

class SessionMachine(RuleBasedStateMachine):
    relay: RelayInstance  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.wire: Wire | None = None
        self.implicit = False
        self.stage = 0
        self.tls = False
        self.esmtp = False
        self.authed = False
        self.last: Reply | None = None
        self.expected = self.stored()
        self.log_index = len(self.relay.raw_log)

    # ------------------------------------------------------------ plumbing

    def stored(self) -> int:
        with contextlib.closing(self.relay.db()) as conn:
            return conn.execute("SELECT COUNT(*) FROM messages WHERE sender != ''").fetchone()[0]

    def connect(self) -> None:
        port = self.relay.ports["implicit" if self.implicit else "starttls"]
        self.wire = Wire(port, implicit=self.implicit, source=None, hostname=self.relay.config["server"]["hostname"],
                         timeout=15)
        self.tls = self.implicit
        self.esmtp = self.authed = False
        self.last = None
        self.errors = 0
        banner = self.read()
        assert banner.code == 220, banner

    def ensure(self) -> None:
        if self.wire is None:
            self.connect()
            self.setup_stage()

    def drop(self) -> None:
        if self.wire is not None:
            self.wire.close()
        self.wire = None

    def send(self, data: bytes) -> None:
        assert self.wire is not None
        try:
            self.wire.send(data)
        except (ConnectionError, ssl.SSLError, BrokenPipeError):
            # The relay closed first: only acceptable after it said so.
            self.check_close_announced(f"send failed after {self.last}")
            self.drop()
            raise _Gone() from None

    def read(self) -> Reply:
        assert self.wire is not None
        try:
            r = self.wire.reply()
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as exc:
            self.check_close_announced(f"closed without 421/221 (last reply {self.last}): {exc}")
            self.drop()
            raise _Gone() from None
        assert not (r.code == 451 and r.lines[-1].startswith("4.3.0")), f"internal error reply: {r}"
        self.last = r
        if r.code >= 500:
            self.errors += 1
        if r.code in (421, 221):
            _note(f"closed with {r.code}")
            self.drop()
            raise _Gone()
        return r

    def check_close_announced(self, what: str) -> None:
        """A close must follow a 421/221, or the max_errors-th error reply (whose 421 a TCP reset of
        our own pipelined bytes may destroy before we read it)."""
        assert (self.last is not None and self.last.code in (421, 221)) or self.errors >= MAX_ERRORS, what

    def cmd(self, line: bytes | str) -> Reply:
        self.send((line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line) + b"\r\n")
        return self.read()

    # ------------------------------------------------------------ rules

    @initialize(implicit=st.booleans(), stage=st.sampled_from([0, 1, 2, 3, 4, 4, 4, 4]))
    def open(self, implicit: bool, stage: int) -> None:
        """Connect and go part of the way (0 banner .. 4 logged in); reconnects redo the same stage."""
        self.implicit, self.stage = implicit, stage
        self._do(lambda: None)

    def setup_stage(self) -> None:
        steps = [lambda: self._greet("client.test", True), self._starttls_if_needed,
                 lambda: self._greet("client.test", True), lambda: self._auth("PLAIN", [])]
        for step in steps[:self.stage]:
            step()

    def _starttls_if_needed(self) -> None:
        if not self.tls:
            self._starttls()

    @rule()
    def login(self) -> None:
        """The whole way to an authenticated session from wherever this one is."""
        def go():
            if not self.esmtp:
                self._greet("client.test", True)
            if not self.tls:
                self._starttls()
                self._greet("client.test", True)
            if not self.authed:
                self._auth("PLAIN", [])
        self._do(go)

    @rule(params=st.one_of(st.just(""), mail_params),
          rcpts=st.lists(st.sampled_from(["<bob@example.net>", "<carol@example.org>", "<victim%x@example.net>",
                                          "<dave@example.net> NOTIFY=NEVER", "<bö@example.net>",
                                          "<bob\udcc3@example.net>"]), min_size=1, max_size=3),
          body=bodies)
    def transaction(self, params: str, rcpts: list[str], body: bytes) -> None:
        """MAIL (own sender, random parameters), RCPTs and DATA in a row: bodies and parameters
        meet an open transaction often."""
        # The body must not end DATA early: CRLF (from the DATA line) + body + CRLF "." CRLF may hold
        # the end marker only at its very end (a body of "." or ending in CRLF "." would end it sooner).
        assume(b"\r\n.\r\n" not in b"\r\n" + body + b"\r\n")

        def go():
            self._mail(f"<{OWN}>", params, False)
            for r in rcpts:
                self._rcpt(r, "")
            self._data(body, "")
        self._do(go)

    @rule(name=helo_names, extended=st.booleans())
    def greet(self, name: str, extended: bool) -> None:
        self._do(self._greet, name, extended)

    def _greet(self, name: str, extended: bool) -> None:
        r = self.cmd(f"{'EHLO' if extended else 'HELO'} {name}".rstrip())
        if r.code == 250:
            self.esmtp = extended
        else:
            assert r.code == 501, r

    @rule()
    def starttls(self) -> None:
        self._do(self._starttls)

    def _starttls(self) -> None:
        r = self.cmd("STARTTLS")
        if r.code == 220:
            assert not self.tls, "STARTTLS accepted twice"
            try:
                self.wire.starttls()
            except (ssl.SSLError, OSError) as exc:
                raise AssertionError(f"TLS handshake after 220 failed: {exc}") from None
            self.tls, self.esmtp, self.authed = True, False, False  # RFC 3207 4.2: start over
        else:
            assert r.code in (503, 501), r

    @rule(mech=st.sampled_from(["PLAIN", "PLAIN-continued", "LOGIN", "LOGIN-initial", "plain"]))
    def auth_good(self, mech: str) -> None:
        self._do(self._auth, mech, [])

    @rule(how=st.sampled_from(["wrong-password", "unknown-user", "garbage-b64", "abort", "abort-initial",
                               "two-fields", "overlong", "authzid-other", "empty", "unknown-mech", "no-mech"]))
    def auth_bad(self, how: str) -> None:
        self._do(self._auth_bad, how)

    def _auth(self, mech: str, _unused) -> None:
        if mech.startswith("PLAIN") or mech == "plain":
            if mech == "PLAIN-continued":
                r = self.cmd("AUTH PLAIN")
                if r.code == 334:
                    r = self.cmd(PLAIN_OK)
            else:
                r = self.cmd(f"AUTH {mech} {PLAIN_OK}")
        else:
            r = self.cmd(f"AUTH LOGIN {b64(USER)}" if mech == "LOGIN-initial" else "AUTH LOGIN")
            if r.code == 334 and mech == "LOGIN":
                r = self.cmd(b64(USER))
            if r.code == 334:
                r = self.cmd(b64(PASSWORD))
        self._auth_result(r, good=True)

    def _auth_bad(self, how: str) -> None:
        script = {
            "wrong-password": [f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + 'wrong password!')}"],
            "unknown-user": ["AUTH LOGIN", b64("nobody@mg.example.com"), b64(PASSWORD)],
            "garbage-b64": ["AUTH PLAIN", "!!not base64!!"],
            "abort": ["AUTH LOGIN", b64(USER), "*"],
            "abort-initial": ["AUTH PLAIN *"],
            "two-fields": [f"AUTH PLAIN {b64(USER + chr(0) + PASSWORD)}"],
            "overlong": [b"AUTH PLAIN " + b"QUFB" * 4000],
            "authzid-other": [f"AUTH PLAIN {b64('boss@mg.example.com' + chr(0) + USER + chr(0) + PASSWORD)}"],
            "empty": ["AUTH PLAIN", ""],
            "unknown-mech": ["AUTH GSSAPI"],
            "no-mech": ["AUTH"],
        }[how]
        r = self.cmd(script[0])
        for line in script[1:]:
            if r.code != 334:
                break
            r = self.cmd(line)
        while r.code == 334:  # the script ran out: cancel
            r = self.cmd("*")
        self._auth_result(r, good=False)

    def _auth_result(self, r: Reply, good: bool) -> None:
        if r.code == 235:
            assert good, f"bad credentials accepted: {r}"
            assert self.tls and self.esmtp and not self.authed, \
                f"235 with tls={self.tls} esmtp={self.esmtp} authed={self.authed}"
            self.authed = True
            _note("auth: 235")
        else:
            assert r.code in (501, 503, 504, 530, 535, 500), r
            # The right credential in the right state must work (no lockout configured here; a
            # transaction cannot be open before AUTH).
            assert not (good and self.tls and self.esmtp and not self.authed), f"correct login refused: {r}"

    @rule(addr=addresses, params=mail_params, spaced=st.booleans())
    def mail(self, addr: str, params: str, spaced: bool) -> None:
        self._do(self._mail, addr, params, spaced)

    def _mail(self, addr: str, params: str, spaced: bool) -> None:
        r = self.cmd(f"MAIL FROM:{' ' if spaced else ''}{addr} {params}".rstrip())
        _note(f"MAIL: {r.code}")
        if r.code == 250:
            assert self.authed, f"MAIL accepted without AUTH: {r}"
        else:
            assert r.code in (501, 503, 530, 552, 553, 555, 550), r

    @rule(addr=addresses, params=rcpt_params)
    def rcpt(self, addr: str, params: str) -> None:
        self._do(self._rcpt, addr, params)

    def _rcpt(self, addr: str, params: str) -> None:
        r = self.cmd(f"RCPT TO:{addr} {params}".rstrip())
        _note(f"RCPT: {r.code}")
        if r.code == 250:
            assert self.authed, f"RCPT accepted without AUTH: {r}"
        else:
            assert r.code in (452, 501, 503, 530, 553, 555, 550), r

    @rule(body=bodies, arg=st.sampled_from(["", "", "", " x"]))
    def data(self, body: bytes, arg: str) -> None:
        assume(b"\r\n.\r\n" not in b"\r\n" + body + b"\r\n")  # ending DATA early turns the rest into commands
        self._do(self._data, body, arg)

    def _data(self, body: bytes, arg: str) -> None:
        r = self.cmd("DATA" + arg)
        if r.code != 354:
            assert r.code in (501, 503, 530), r
            return
        assert self.authed, "DATA accepted without AUTH"
        self.send(body + b"\r\n.\r\n")
        r = self.read()
        _note(f"DATA end: {r.code}")
        if r.code == 250:
            assert self.authed
            self.expected += 1
        else:
            assert r.code in (550, 552, 554), r

    @rule(verb=st.sampled_from(["RSET", "NOOP", "VRFY x", "HELP", "rset", "noop", "RSET", "NOOP", "QUIT"]))
    def simple(self, verb: str) -> None:
        def go():
            r = self.cmd(verb)
            assert verb != "QUIT", f"QUIT answered {r}"  # read() raises _Gone on 221
        self._do(go)

    @rule(line=junk_lines)
    def junk(self, line: bytes) -> None:
        assume(_verb(line) not in PROTOCOL_VERBS)
        self._do(self._junk, line)

    def _junk(self, line: bytes) -> None:
        r = self.cmd(line)
        if r.code == 250 and _verb(line) in (b"MAIL", b"RCPT"):
            assert self.authed
        if r.code == 250 and _verb(line) in (b"EHLO", b"HELO"):
            self.esmtp = _verb(line) == b"EHLO"

    @rule(cmds=st.lists(st.sampled_from([
        "NOOP", "RSET", f"MAIL FROM:<{OWN}>", "RCPT TO:<bob@example.net>", "RCPT TO:<a%b@example.net>",
        "EHLO pipelined.test", "XYZZY", "VRFY bob"]), min_size=2, max_size=8))
    def pipelined(self, cmds: list[str]) -> None:
        def go():
            self.send("".join(c + "\r\n" for c in cmds).encode())
            for c in cmds:
                r = self.read()
                if r.code == 250 and c.startswith(("MAIL", "RCPT")):
                    assert self.authed, f"{c} accepted without AUTH: {r}"
                if r.code == 250 and c.startswith("EHLO"):
                    self.esmtp = True
        self._do(go)

    # ------------------------------------------------------------ invariants

    @invariant()
    def relay_alive_and_quiet(self) -> None:
        assert self.relay.proc is not None and self.relay.proc.poll() is None, "the relay died"
        new = self.relay.raw_log[self.log_index:]
        bad = [line for line in new if "Traceback" in line or '"level": "error"' in line.lower()]
        assert not bad, "relay logged errors:\n" + "\n".join(new[-40:])

    @invariant()
    def stored_only_after_250(self) -> None:
        assert self.stored() == self.expected, (self.stored(), self.expected)

    def teardown(self) -> None:
        self.drop()
        # Barrier: once every session the relay opened has logged its disconnect, everything it
        # logged before (a traceback, say) is in raw_log, so the next example starts clean.
        deadline = time.monotonic() + 10
        while len(self.relay.events_named("disconnect")) < len(self.relay.events_named("connect")):
            assert time.monotonic() < deadline, "relay did not log the disconnects"
            time.sleep(0.005)

    # ------------------------------------------------------------ helpers

    def _do(self, fn, *args) -> None:
        try:
            self.ensure()
            fn(*args)
        except _Gone:
            pass


class _Gone(Exception):
    """The relay said 421/221 and closed: the next rule reconnects."""


def _note(what: str) -> None:
    event(what)
    STATS[what] += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fuzz_relay(tmp_path_factory):
    inst = RelayInstance(tmp_path_factory.mktemp("fuzz"), config={
        # Accepted mail stays queued (the smarthost port is closed), so counting rows is exact.
        "delivery": {"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
                     "retry_schedule": [3600]},
        "limits": {"message_size": MESSAGE_SIZE, "auth_failures": 100_000, "auth_failure_delay": 0.01,
                   "max_received_headers": 30},
    })
    inst.add_user(USER, PASSWORD)
    inst.start()
    yield inst
    inst.stop()


@pytest.mark.timeout(600)  # a failure is shrunk over real sockets: give it time to report
def test_session_fuzz(fuzz_relay):
    SessionMachine.relay = fuzz_relay
    run_state_machine_as_test(SessionMachine, settings=settings(
        max_examples=80, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    print("session fuzz exercised:", dict(sorted(STATS.items())))
    # The run must have reached the interesting states, or it proved nothing.
    assert STATS["auth: 235"] and STATS["DATA end: 250"] and STATS["MAIL: 250"] and STATS["RCPT: 250"], STATS
    assert fuzz_relay.proc.poll() is None
    assert not any("Traceback" in line for line in fuzz_relay.raw_log)
