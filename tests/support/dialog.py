"""Dialog runner: one SMTP conversation per file under tests/dialogs/, played over a real socket.

A dialog file is a script of what the client sends and what it must get back, one directive a
line. Blank lines and lines starting with `#` are comments.

    C: <text>         send <text> + CRLF (UTF-8). Placeholders: {user}, {password}, {i} (the
                      repeat counter), and {b64:<text>}: base64 of <text> after Python escape
                      decoding, e.g. `C: AUTH PLAIN {b64:\\x00{user}\\x00{password}}`
    B: <bytes>        send raw bytes: a Python bytes literal, optionally combined with + and an
                      integer *, e.g. `B: b"NOOP " + b"x" * 2000 + b"\\r\\n"`. Nothing is added.
    S: <code> [<st>]  read one reply (every line of a multi-line reply); its code must be <code>
                      and, when given, its last line must start with the enhanced status <st>
    S~ <regex>        read one reply; re.search(<regex>, "<code> <text>") must match, where <text>
                      is the reply's lines (without their codes) joined by newlines
    TLS               TLS handshake on the socket, after `C: STARTTLS` / `S: 220` (or their raw
                      `B:` form): asserts that no plaintext arrived after the 220
    AUTH              AUTH PLAIN with the fixture credential; expects 235 2.7.0
    CLOSE             the server closes the connection, sending nothing more
    QUEUE <n>         exactly n messages were stored (committed) since the dialog began
    MX <n>            wait until every message stored by this dialog reached the MX sink: exactly
                      n did, once each, none with a bare CR, bare LF or NUL on the wire
    CONNECT [implicit] [from=<ip>]
                      (re)connect, to the implicit-TLS port if asked, from a loopback source
                      address if asked; reads the 220 banner. A dialog that does not begin with
                      CONNECT begins with a plain CONNECT to the STARTTLS port.
    <n>* <directive>  the directive n times; {i} counts 1..n (`100* C: RCPT TO:<r{i}@x.net>`)
    XFAIL: <reason>   header line: the dialog proves a known bug (the test is xfail, strict)

Every reply is checked on the way in, whatever the directive: each line is `ddd-` or `ddd `
with one code per reply; every reply but the banner, the EHLO/HELO greeting, 334 and 354
carries an RFC 3463 enhanced status whose class matches the code; no reply names a Python
exception or carries a traceback. After the dialog the relay must still run and must not have
logged a traceback.
"""
from __future__ import annotations

import ast
import base64
import codecs
import contextlib
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.relay_instance import RelayInstance, client_tls_context

REPLY_LINE = re.compile(r"^(\d{3})([ -])(.*)$", re.S)
ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}(?: |$)")
# What must never reach a client: a Python exception name or traceback, aiosmtpd's "500 Error: (...)".
LEAK = re.compile(r"Traceback|\bError\b|\b[A-Z][A-Za-z]*(?:Error|Exception)\b|(?i:sqlite)")
BARE_LF = re.compile(rb"(?<!\r)\n")
BARE_CR = re.compile(rb"\r(?!\n)")
QID_IN_RECEIVED = re.compile(rb"\(relay\) with [A-Z0-9]+ id ([0-9A-Za-z]+)")


class DialogError(AssertionError):
    pass


class ConnectionClosed(DialogError):
    """The server closed the connection while a reply was awaited."""


@dataclass
class Reply:
    code: int
    lines: list[str]  # text after "ddd-" / "ddd "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass
class Step:
    lineno: int
    kind: str       # C B S S~ TLS AUTH CLOSE QUEUE MX CONNECT
    arg: str
    repeat: int = 1


@dataclass
class Dialog:
    path: Path
    steps: list[Step]
    xfail: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem


_KINDS = ("C:", "B:", "S:", "S~", "TLS", "AUTH", "CLOSE", "QUEUE", "MX", "CONNECT")


def parse(path: Path) -> Dialog:
    steps: list[Step] = []
    xfail = None
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("XFAIL:"):
            xfail = line[6:].strip()
            continue
        repeat = 1
        m = re.match(r"^(\d+)\*\s+(.*)$", line)
        if m:
            repeat, line = int(m.group(1)), m.group(2)
        for kind in _KINDS:
            if line.startswith(kind):
                arg = line[len(kind):]
                if kind.endswith((":", "~")):
                    arg = arg[1:] if arg.startswith(" ") else arg  # exactly one separating space
                else:
                    if arg and not arg.startswith(" "):
                        continue  # e.g. "CLOSED": not this directive
                    arg = arg.strip()
                steps.append(Step(n, kind.rstrip(":"), arg, repeat))
                break
        else:
            raise ValueError(f"{path.name}:{n}: unknown directive {line!r}")
    return Dialog(path, steps, xfail)


def load_all(directory: Path) -> list[Dialog]:
    files = sorted(p for p in directory.iterdir() if p.suffix in (".dialog", ".txt"))
    return [parse(p) for p in files]


# ---------------------------------------------------------------- expression helpers

def bytes_expr(text: str) -> bytes:
    """Evaluate b"..." literals joined by + and repeated by integer *; nothing else is allowed."""
    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, int)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"not allowed in B: {ast.dump(node)}")
    value = ev(ast.parse(text, mode="eval"))
    if not isinstance(value, bytes):
        raise ValueError(f"B: must evaluate to bytes, got {type(value).__name__}")
    return value


def expand(text: str, *, user: str, password: str, i: int) -> bytes:
    text = text.replace("{user}", user).replace("{password}", password).replace("{i}", str(i))

    def b64(m: re.Match) -> str:
        raw = codecs.escape_decode(m.group(1).encode("utf-8"))[0]
        return base64.b64encode(raw).decode("ascii")
    text = re.sub(r"\{b64:(.*?)\}", b64, text)
    return text.encode("utf-8")


def qid_of(data: bytes) -> str | None:
    m = QID_IN_RECEIVED.search(data)
    return m.group(1).decode() if m else None


# ---------------------------------------------------------------- the client

class Wire:
    """Blocking socket with a read buffer; replies are parsed and checked as they come."""

    def __init__(self, port: int, *, implicit: bool, source: str | None, hostname: str, timeout: float = 15):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if implicit:
            sock = client_tls_context().wrap_socket(sock)
        self.sock = sock
        self.buf = b""
        self.hostname = hostname
        self.transcript: list[str] = []

    def send(self, data: bytes) -> None:
        self.transcript.append(f"C: {data[:200]!r}{'...' if len(data) > 200 else ''}")
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(f"connection closed while waiting for a reply; pending {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        if not line.endswith(b"\r"):
            raise DialogError(f"reply line not ended by CRLF: {line!r}")
        return line[:-1]

    def reply(self) -> Reply:
        lines: list[str] = []
        code = None
        while True:
            raw = self._line()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DialogError(f"reply is not UTF-8: {raw!r}") from None
            m = REPLY_LINE.match(text)
            if not m:
                raise DialogError(f"malformed reply line {text!r}")
            if code is not None and int(m.group(1)) != code:
                raise DialogError(f"code changed inside a multi-line reply: {lines} then {text!r}")
            code = int(m.group(1))
            lines.append(m.group(3))
            self.transcript.append(f"S: {text}")
            if m.group(2) == " ":
                r = Reply(code, lines)
                check_reply(r, self.hostname)
                return r

    def expect_close(self, timeout: float = 10) -> None:
        if self.buf:
            raise DialogError(f"expected the server to close; it sent {self.buf!r}")
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return
        except (TimeoutError, socket.timeout):
            raise DialogError(f"server did not close the connection within {timeout}s") from None
        if data:
            raise DialogError(f"expected the server to close; it sent {data!r}")

    def starttls(self) -> None:
        if self.buf:
            raise DialogError(f"plaintext after the 220 to STARTTLS: {self.buf!r}")
        self.sock = client_tls_context().wrap_socket(self.sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def check_reply(r: Reply, hostname: str) -> None:
    """The invariants every reply of the relay must meet."""
    text = r.text
    if LEAK.search(text):
        raise DialogError(f"reply leaks an internal error: {r}")
    greeting = r.code in (220, 250) and r.lines[0].split(" ")[0] == hostname
    if r.code in (334, 354) or greeting:
        return
    last = r.lines[-1]
    m = ENHANCED.match(last)
    if not m:
        raise DialogError(f"reply without an enhanced status code (RFC 2034): {r}")
    if m.group(1) != str(r.code)[0]:
        raise DialogError(f"enhanced status class does not match the reply code: {r}")


# ---------------------------------------------------------------- the runner

@dataclass
class DialogRunner:
    relay: RelayInstance
    sink: object            # tests.support.mx_sink.MXSink, or None for dialogs without MX
    user: str
    password: str
    wire: Wire | None = None
    known: set[str] = field(default_factory=set)
    sink_base: int = 0
    log_base: int = 0

    # ------------------------------------------------------------ what the relay stored

    def sink_ids(self, start: int = 0) -> list[str | None]:
        if self.sink is None:
            return []
        return [qid_of(m.data) for m in list(self.sink.messages)[start:] if m.mail_from not in ("", "<>")]

    def stored_ids(self) -> set[str]:
        """Every message the relay committed that is still queued or already at the MX (not bounces).

        The database is read first: a message leaves it only after the sink recorded it, so nothing
        committed can slip between the two reads.
        """
        with contextlib.closing(self.relay.db()) as conn:
            db = {r["id"] for r in conn.execute("SELECT id FROM messages WHERE sender != ''")}
        return db | {q for q in self.sink_ids() if q}

    # ------------------------------------------------------------ directives

    def connect(self, arg: str) -> None:
        if self.wire is not None:
            self.wire.close()
        words = arg.split()
        implicit = "implicit" in words
        source = next((w[5:] for w in words if w.startswith("from=")), None)
        port = self.relay.ports["implicit" if implicit else "starttls"]
        self.wire = Wire(port, implicit=implicit, source=source, hostname=self.relay.config["server"]["hostname"])
        banner = self.wire.reply()
        if banner.code != 220:
            raise DialogError(f"banner: {banner}")

    def run(self, dialog: Dialog) -> None:
        self.known = self.stored_ids()
        self.sink_base = len(self.sink.messages) if self.sink is not None else 0
        self.log_base = len(self.relay.raw_log)
        steps = dialog.steps
        try:
            if not steps or steps[0].kind != "CONNECT":
                self.connect("")
            for step in steps:
                for i in range(1, step.repeat + 1):
                    try:
                        self.step(step, i)
                    except DialogError as exc:
                        raise DialogError(f"{dialog.path.name}:{step.lineno}: {exc}\n--- transcript (last 30) ---\n"
                                          + "\n".join(self.wire.transcript[-30:] if self.wire else [])) from None
                    except (OSError, ssl.SSLError) as exc:
                        raise DialogError(f"{dialog.path.name}:{step.lineno}: {type(exc).__name__}: {exc}\n"
                                          + "\n".join(self.wire.transcript[-30:] if self.wire else [])) from None
        finally:
            if self.wire is not None:
                self.wire.close()
                self.wire = None
        assert self.relay.proc is not None and self.relay.proc.poll() is None, "the relay died"
        new_log = self.relay.raw_log[self.log_base:]
        assert not any("Traceback" in line for line in new_log), "relay logged a traceback:\n" + "\n".join(new_log)

    def step(self, step: Step, i: int) -> None:
        kind, arg = step.kind, step.arg
        if kind == "CONNECT":
            self.connect(arg)
            return
        w = self.wire
        assert w is not None
        if kind == "C":
            w.send(expand(arg, user=self.user, password=self.password, i=i) + b"\r\n")
        elif kind == "B":
            w.send(bytes_expr(arg))
        elif kind == "S":
            want = arg.split()
            r = w.reply()
            if r.code != int(want[0]):
                raise DialogError(f"expected {arg}, got {r}")
            if len(want) > 1 and not (r.lines[-1] + " ").startswith(want[1] + " "):
                raise DialogError(f"expected {arg}, got {r}")
        elif kind == "S~":
            r = w.reply()
            if not re.search(arg, str(r)):
                raise DialogError(f"expected a reply matching {arg!r}, got {r}")
        elif kind == "TLS":
            w.starttls()
        elif kind == "AUTH":
            w.send(expand("AUTH PLAIN {b64:\\x00{user}\\x00{password}}", user=self.user, password=self.password,
                          i=i) + b"\r\n")
            r = w.reply()
            if r.code != 235 or not r.lines[-1].startswith("2.7.0"):
                raise DialogError(f"AUTH with the fixture credential: {r}")
        elif kind == "CLOSE":
            w.expect_close()
        elif kind == "QUEUE":
            new = self.stored_ids() - self.known
            if len(new) != int(arg):
                raise DialogError(f"expected {arg} stored message(s) since the dialog began, found {sorted(new)}")
        elif kind == "MX":
            self.check_mx(int(arg))
        else:  # pragma: no cover - parse() admits only the kinds above
            raise DialogError(f"unknown directive {kind}")

    def check_mx(self, n: int, timeout: float = 20) -> None:
        if self.sink is None:
            raise DialogError("MX needs a runner with an MX sink")
        mine = self.stored_ids() - self.known
        deadline = time.monotonic() + timeout
        while not mine <= set(self.sink_ids(self.sink_base)):
            if time.monotonic() > deadline:
                raise DialogError(f"not at the MX within {timeout}s: {sorted(mine - set(self.sink_ids()))}")
            time.sleep(0.02)
        got = [m for m in list(self.sink.messages)[self.sink_base:] if m.mail_from not in ("", "<>")]
        ours = [m for m in got if qid_of(m.data) in mine]
        strays = [m for m in got if qid_of(m.data) is None]
        if strays:
            raise DialogError(f"the MX received message(s) the relay never queued (smuggled?): "
                              f"{[m.data[:200] for m in strays]}")
        if len(ours) != n:
            raise DialogError(f"expected {n} message(s) at the MX, got {len(ours)}: {[qid_of(m.data) for m in ours]}")
        for m in ours:
            for what, pattern in (("bare LF", BARE_LF), ("bare CR", BARE_CR)):
                hit = pattern.search(m.data)
                if hit:
                    raise DialogError(f"{what} on the wire to the MX at {hit.start()}: "
                                      f"{m.data[max(0, hit.start() - 40):hit.start() + 40]!r}")
            if b"\x00" in m.data:
                raise DialogError("NUL on the wire to the MX")
