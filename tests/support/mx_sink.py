"""A real, scriptable SMTP server for tests: plays the remote MX host or a smarthost.

``MXSink`` runs aiosmtpd on its own event loop in a daemon thread, so sync tests,
async tests (on their own loop) and a relay in a subprocess can all talk to it.
It listens on an ephemeral port, records every accepted message, and can reply
with scripted codes or misbehave (drop, stall) on cue::

    with MXSink() as mx:
        mx.rcpt_replies["bob@example.org"] = "550 5.1.1 No such user"
        ...deliver to mx.address...
        assert mx.wait_for(1)
        assert mx.messages[0].rcpt_tos == ["alice@example.org"]

Scripted attributes are read when they matter (``mode`` at accept time for
``drop_on_connect``/``stall_banner``, at the final dot for the DATA modes), so a
test may change them between or even during connections.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import ipaddress
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "MODES",
    "MXSink",
    "SinkMessage",
    "load_server_tls_context",
    "make_test_cert_files",
    "make_test_tls_context",
    "shared_cert_files",
]

MODES = frozenset({"accept", "drop_on_connect", "drop_at_data", "stall_data", "stall_banner"})

DEFAULT_MAIL_REPLY = "250 2.1.0 OK"
DEFAULT_RCPT_REPLY = "250 2.1.5 OK"
DEFAULT_DATA_REPLY = "250 2.0.0 OK: queued"

# Large enough for any test message, but set so that SIZE is advertised like a real MX does.
DATA_SIZE_LIMIT = 64 * 1024 * 1024

_DSN_MAIL_PARAMS = frozenset({"RET", "ENVID"})
_DSN_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # envelope.original_content: exactly as received, after dot-unstuffing
    mail_options: list[str]  # aiosmtpd upper-cases these; DSN params (RET=, ENVID=) kept as sent
    rcpt_options: list[str]  # flat, in RCPT order; DSN params (NOTIFY=, ORCPT=) kept as sent
    tls: bool  # STARTTLS had been done when DATA completed
    auth_user: str | None  # login, if the client authenticated
    connection: int  # serial of the TCP connection (1, 2, ...): equal serials prove reuse


# --------------------------------------------------------------------------- protocols


class _Session(Session):
    # aiosmtpd itself still sets the deprecated Session.login_data after a successful
    # AUTH, which would drop a DeprecationWarning into whichever test is running.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP plus connection bookkeeping and DSN parameter support."""

    def __init__(self, sink: MXSink, handler: _Handler, *, auth_required: bool, **kwargs: Any):
        # aiosmtpd warns (warnings + log) when AUTH is required without TLS; for a
        # plain-text smarthost fixture that is intended, so set the flag afterwards.
        # (Filtering the warning instead would race pytest's per-test warning capture,
        # since we run in another thread.)
        super().__init__(handler, auth_required=False, **kwargs)
        self._auth_required = auth_required
        self.sink = sink
        self.serial = 0
        self.raw_transport: asyncio.BaseTransport | None = None
        self.dsn_params: list[str] = []

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls connection_made again on the same instance after STARTTLS
        # (with the TLS transport); only the first call is a new TCP connection.
        if self.transport is None:
            self.raw_transport = transport
            self.serial = self.sink._register(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._unregister(self.raw_transport)
        super().connection_lost(error)

    async def smtp_MAIL(self, arg: str | None) -> None:
        names = _DSN_MAIL_PARAMS | ({"REQUIRETLS"} if self.sink.advertise_requiretls else set())
        await super().smtp_MAIL(self._take_dsn_params(arg, frozenset(names)))

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(self._take_dsn_params(arg, _DSN_RCPT_PARAMS))

    def _take_dsn_params(self, arg: str | None, names: frozenset[str]) -> str | None:
        """Strip DSN parameters aiosmtpd would refuse with 555; the handler records them."""
        self.dsn_params = []
        if not arg or not (self.sink.advertise_dsn or self.sink.advertise_requiretls) \
                or not self.session.extended_smtp:
            return arg
        # Parameters follow the bracketed path; look only after '>' so an address
        # can never be mistaken for a parameter.
        head, bracket, tail = arg.rpartition(">")
        if not bracket:
            return arg
        kept = []
        for token in tail.split():
            if token.partition("=")[0].upper() in names:
                self.dsn_params.append(token)
            else:
                kept.append(token)
        return head + bracket + "".join(" " + t for t in kept)


class _RawProtocol(asyncio.Protocol):
    """Misbehaving peer that never speaks SMTP: optional one-line greeting, then close or hang."""

    def __init__(self, sink: MXSink, greeting: str | None, hang: bool):
        self.sink = sink
        self.greeting = greeting
        self.hang = hang
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sink._register(transport)
        if self.greeting is not None:
            transport.write(self.greeting.encode() + b"\r\n")
        if not self.hang:
            transport.close()  # close() flushes the greeting first

    def data_received(self, data: bytes) -> None:
        pass  # whatever the client says is ignored

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink._unregister(self.transport)


class _Handler:
    """aiosmtpd handler hooks. Note: any attribute named auth_* or handle_* here
    would be picked up by aiosmtpd as an AUTH mechanism or hook."""

    def __init__(self, sink: MXSink):
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # the 5-argument hook must do this itself
        if self.sink.auth is None:
            # aiosmtpd always lists AUTH; a sink without credentials must not offer it.
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        if self.sink.advertise_dsn:
            responses.insert(len(responses) - 1, "250-DSN")  # before the final "250 HELP"
        if self.sink.advertise_requiretls and session.ssl is not None:
            responses.insert(len(responses) - 1, "250-REQUIRETLS")  # RFC 8689 2: only over TLS
        if self.sink.strip_starttls:
            # A STARTTLS-stripping man in the middle: the extension vanishes from the EHLO reply.
            responses = [r for r in responses if "STARTTLS" not in r.upper()]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self.sink.mail_reply or DEFAULT_MAIL_REPLY
        # Returning a status means aiosmtpd leaves the envelope to us.
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options + server.dsn_params)
        return reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.rcpt_replies.get(address.lower(), DEFAULT_RCPT_REPLY)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options + server.dsn_params)
        return reply

    async def handle_DATA(self, server, session, envelope):
        sink = self.sink
        mode = sink.mode
        if mode in ("drop_at_data", "stall_data"):
            if mode == "drop_at_data":
                # Close the TCP socket itself: closing the TLS app transport would
                # wait for the client's close_notify instead of dropping.
                server.raw_transport.close()
            # Never reply. connection_lost (from the close above, or stop()) cancels
            # this task; the stop event is a backstop so nothing outlives the sink.
            await sink._stopping.wait()
            raise asyncio.CancelledError
        auth_data = session.auth_data
        login = getattr(auth_data, "login", None)
        message = SinkMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            tls=session.ssl is not None,
            auth_user=login.decode("utf-8", "replace") if isinstance(login, bytes) else login,
            connection=server.serial,
        )
        reply = sink.data_reply or DEFAULT_DATA_REPLY
        # Only what the MX took responsibility for counts as delivered.
        (sink.messages if reply.startswith("2") else sink.rejected).append(message)
        return reply


# --------------------------------------------------------------------------- the sink


class MXSink:
    """Real SMTP server on ``host``:ephemeral port, on its own loop thread. See module doc."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "mx.test",
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool = False,
        auth: dict[str, str] | None = None,
        advertise_dsn: bool = False,
    ):
        if require_tls and tls_context is None:
            raise ValueError("require_tls needs a tls_context")
        self.host = host
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_tls = require_tls
        self.auth = auth
        self.advertise_dsn = advertise_dsn
        self._requested_port = port

        # Scripted behaviour: plain attributes, read on the loop thread when needed.
        self.strip_starttls = False       # drop STARTTLS from EHLO (a downgrade attack)
        self.advertise_requiretls = False  # offer REQUIRETLS (RFC 8689) after STARTTLS
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.greeting_reply: str | None = None
        self._mode = "accept"

        # Observations. Appended on the loop thread; list.append is atomic under the GIL.
        self.messages: list[SinkMessage] = []
        self.rejected: list[SinkMessage] = []  # recorded when data_reply was not 2xx
        self.connections = 0
        self.port = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._state_lock = threading.Lock()
        self._stopped = False

    # -- scripted behaviour

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        # Validate here: a typo would otherwise surface only as a log line on the loop thread.
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; expected one of {sorted(MODES)}")
        self._mode = value

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- lifecycle

    def start(self) -> MXSink:
        with self._state_lock:
            if self._loop is not None:
                raise RuntimeError("MXSink can only be started once")
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"MXSink-{self.hostname}", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with self._state_lock:
            if self._loop is None or self._stopped:
                return
            self._stopped = True
        loop = self._loop
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        except Exception:
            pass  # best effort: the loop is stopped below regardless
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> MXSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<MXSink {self.host}:{self.port} mode={self._mode} "
            f"messages={len(self.messages)} connections={self.connections}>"
        )

    # -- waiting

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    async def await_for(self, n: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def clear(self) -> None:
        """Forget recorded messages. ``connections`` keeps counting so serials stay unique."""
        self.messages.clear()
        self.rejected.clear()

    # -- loop thread internals

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await self._loop.create_server(
            self._make_protocol, self.host, self._requested_port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _make_protocol(self) -> asyncio.BaseProtocol:
        # Called once per accepted connection, so mode/greeting are sampled at accept time.
        mode = self._mode
        if mode == "drop_on_connect" or self._stopping.is_set():
            return _RawProtocol(self, greeting=None, hang=False)
        if mode == "stall_banner":
            return _RawProtocol(self, greeting=None, hang=True)
        if self.greeting_reply is not None:
            return _RawProtocol(self, greeting=self.greeting_reply, hang=False)
        return _SinkSMTP(
            self,
            _Handler(self),
            hostname=self.hostname,
            tls_context=self.tls_context,
            require_starttls=self.require_tls,
            auth_required=self.auth is not None,
            # With a TLS context, AUTH is offered (and accepted) only after STARTTLS.
            auth_require_tls=self.tls_context is not None,
            authenticator=self._authenticate if self.auth is not None else None,
            enable_SMTPUTF8=True,
            data_size_limit=DATA_SIZE_LIMIT,
            decode_data=False,
            loop=self._loop,
        )

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.auth is not None:
            login = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if login in self.auth and self.auth[login] == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)  # aiosmtpd replies 535 5.7.8

    def _register(self, transport: asyncio.BaseTransport) -> int:
        self.connections += 1
        self._transports.add(transport)
        return self.connections

    def _unregister(self, transport: asyncio.BaseTransport | None) -> None:
        self._transports.discard(transport)

    async def _shutdown(self) -> None:
        self._stopping.set()
        server = self._server
        if server is not None:
            # Stop accepting first and let connections the loop has already accepted
            # finish their setup: on 3.11, closing the server under a pending accept
            # leaks that socket ("Error on transport creation" + ResourceWarning).
            for sock in server.sockets:
                self._loop.remove_reader(sock.fileno())
            for _ in range(3):
                await asyncio.sleep(0)
            server.close()
        # abort(): stalled peers may never read, so don't wait to flush anything.
        for transport in list(self._transports):
            transport.abort()
        # Let connection_lost run so aiosmtpd cancels its own session tasks, then
        # reap whatever is left so the loop closes without "Task was destroyed" noise.
        for _ in range(5):
            await asyncio.sleep(0)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)


# --------------------------------------------------------------------------- TLS helpers


def make_test_cert_files(directory: str | os.PathLike[str], hostname: str = "mx.test") -> tuple[str, str]:
    """Write a throwaway self-signed EC P-256 cert and key as PEM; return (cert_path, key_path).

    SANs: ``hostname`` (DNS, or IP if it parses as one) and 127.0.0.1. The cert is
    marked as a CA so clients can trust it directly via ``cafile=cert_path``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    try:
        primary: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        primary = x509.DNSName(hostname)
    sans = [primary]
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    if loopback != primary:
        sans.append(loopback)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Key identifiers keep OpenSSL's X509_STRICT mode (default from Python 3.13) happy.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory = os.fspath(directory)
    cert_path = os.path.join(directory, f"{hostname}-cert.pem")
    key_path = os.path.join(directory, f"{hostname}-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path


def load_server_tls_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """Server-side context (TLS >= 1.2, no client certs) from PEM files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


_cert_lock = threading.Lock()
_cert_dir: tempfile.TemporaryDirectory[str] | None = None
_cert_files: dict[str, tuple[str, str]] = {}


def shared_cert_files(hostname: str = "mx.test") -> tuple[str, str]:
    """(cert_path, key_path) for ``hostname``, generated once per process.

    Use the cert path as a client's ``cafile`` to verify a sink built with
    ``make_test_tls_context(hostname)``.
    """
    global _cert_dir
    with _cert_lock:
        if hostname not in _cert_files:
            if _cert_dir is None:
                # Held in a module global so the files live as long as the process.
                _cert_dir = tempfile.TemporaryDirectory(prefix="mx-sink-certs-")
                atexit.register(_cert_dir.cleanup)
            _cert_files[hostname] = make_test_cert_files(_cert_dir.name, hostname)
        return _cert_files[hostname]


def make_test_tls_context(hostname: str = "mx.test") -> ssl.SSLContext:
    """Fresh server-side SSLContext over this process's throwaway cert for ``hostname``."""
    return load_server_tls_context(*shared_cert_files(hostname))


class SlowSink(MXSink):
    """Records each message at the final dot, then waits `data_delay` seconds before its 250.

    A relay killed during that wait has handed the message over without hearing so: exactly the
    in-flight case where RFC 5321 6.1 accepts a duplicate rather than a loss.
    """

    def __init__(self, data_delay: float, **kw):
        super().__init__(**kw)
        self.data_delay = data_delay

    def _make_protocol(self):
        proto = super()._make_protocol()
        hooks = getattr(proto, "_handle_hooks", None)  # aiosmtpd's handler hook table
        if hooks and "DATA" in hooks:
            original = hooks["DATA"]

            async def slow_data(server, session, envelope):
                status = await original(server, session, envelope)
                await asyncio.sleep(self.data_delay)
                return status

            hooks["DATA"] = slow_data
        return proto
