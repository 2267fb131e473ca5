"""One outbound SMTP session to one host (aiosmtplib), carrying messages in a row.

Maps every remote reply to a per-recipient outcome: 2xx delivered, 4xx transient, 5xx
permanent; anything that breaks the connection is transient (RFC 5321 4.2.1, 6.1: after the
final dot without a reply we do not know, so we retry and accept a possible duplicate).
"""
from __future__ import annotations

import re
import ssl

import aiosmtplib

from ..policy import xtext_encode
from . import DELIVERED, PERMANENT, TRANSIENT, Envelope, RcptOutcome, all_same

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class ConnectFailure(Exception):
    def __init__(self, reply: str, status: str = "4.4.1", tls_failed: bool = False, permanent: bool = False,
                 host: str | None = None, tls: str | None = None):
        super().__init__(reply)
        self.reply = reply
        self.status = status
        self.tls_failed = tls_failed
        self.permanent = permanent
        self.host = host           # the host that failed, for Remote-MTA and the log
        self.tls = tls             # "failed" (handshake/verification) or "unavailable" (no STARTTLS), for the log


def status_of(code: int, message: str) -> str:
    m = _ENHANCED.match(message.strip())
    if m and m.group(1) == str(code)[0]:
        return m.group(0)
    return f"{str(code)[0]}.0.0"


class StaleSession(Exception):
    """A reused session was found closed before anything of this message was sent: reconnect and retry."""


def outcome_of(code: int, message: str, host: str, tls: str | None, dsn: bool = False) -> RcptOutcome:
    text = " ".join(message.split())[:900]
    reply = f"{code} {text}"
    kind = DELIVERED if 200 <= code < 300 else PERMANENT if 500 <= code < 600 else TRANSIENT
    return RcptOutcome(kind, reply, status_of(code, text) if kind != DELIVERED else "2.0.0", host, tls,
                       dsn and kind == DELIVERED)


def _describe_exc(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {' '.join(exc.message.split())}"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return "timeout"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return "connection lost"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure ({exc.reason or exc})"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


class Session:
    """An open, greeted (and where possible encrypted) session to `host`."""

    def __init__(self, client: aiosmtplib.SMTP, host: str, tls: str | None):
        self.client = client
        self.host = host
        self.tls = tls or "plain"
        self.messages = 0
        self.alive = True

    @classmethod
    async def open(cls, *, address: str, port: int, host: str, helo: str, connect_timeout: float,
                   command_timeout: float, tls: str, verify: bool, username: str = "", password: str = "",
                   tls_context: ssl.SSLContext | None = None) -> "Session":
        """tls: 'opportunistic' | 'required' | 'starttls' | 'implicit' | 'none'."""
        client = aiosmtplib.SMTP(hostname=address, port=port, local_hostname=helo, timeout=command_timeout,
                                 use_tls=tls == "implicit", start_tls=False, validate_certs=verify,
                                 tls_context=tls_context if tls == "implicit" else None)
        where = f"{host}[{address}]:{port}"
        try:
            await client.connect(timeout=connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise ConnectFailure(f"{where} greeted with {_describe_exc(exc)}", status_of(exc.code, exc.message),
                                 host=host) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            implicit = tls == "implicit"
            raise ConnectFailure(f"{where}: {_describe_exc(exc)}", tls_failed=implicit, host=host,
                                 tls="failed" if implicit and isinstance(exc.__cause__ or exc, ssl.SSLError)
                                 else None) from None
        try:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # RFC 5321 3.2: an old server that refuses EHLO still speaks SMTP
            if tls in ("opportunistic", "required", "starttls"):
                if client.supports_extension("starttls"):
                    try:
                        await client.starttls(server_hostname=host, validate_certs=verify, tls_context=tls_context)
                    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                        client.close()
                        raise ConnectFailure(f"{where}: STARTTLS failed: {_describe_exc(exc)}",
                                             "4.7.5" if tls != "opportunistic" else "4.4.1", tls_failed=True,
                                             host=host, tls="failed") from None
                    await client.ehlo()
                elif tls != "opportunistic":
                    client.close()
                    raise ConnectFailure(f"{where} does not offer STARTTLS and TLS is required", "4.7.5",
                                         host=host, tls="unavailable")
            if username:
                try:
                    await client.login(username, password)
                except aiosmtplib.SMTPResponseException as exc:
                    client.close()
                    # Transient on purpose: a wrong smarthost password is the operator's to fix, not a bounce.
                    raise ConnectFailure(f"{where} refused our login: {_describe_exc(exc)}", "4.7.0",
                                         host=host) from None
        except ConnectFailure:
            raise
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            client.close()
            raise ConnectFailure(f"{where}: {_describe_exc(exc)}", host=host) from None
        ssl_obj = client.transport.get_extra_info("ssl_object") if client.transport else None
        return cls(client, host, ssl_obj.version() if ssl_obj else None)

    async def send(self, env: Envelope) -> dict[str, RcptOutcome]:
        c = self.client
        opts: list[str] = []
        if c.supports_extension("size"):
            opts.append(f"SIZE={len(env.data)}")
        if not env.data.isascii() and c.supports_extension("8bitmime"):
            opts.append("BODY=8BITMIME")
        if env.smtputf8:
            if not c.supports_extension("smtputf8"):
                return all_same(env, RcptOutcome(
                    PERMANENT, f"{self.host} does not support SMTPUTF8, required by this message's addresses",
                    "5.6.7", self.host, self.tls))
            opts.append("SMTPUTF8")
        dsn = c.supports_extension("dsn")
        if dsn and env.ret:
            opts.append(f"RET={env.ret}")
        if dsn and env.envid:
            opts.append(f"ENVID={xtext_encode(env.envid)}")
        enc = "utf-8" if env.smtputf8 else "ascii"
        reused = self.messages > 0
        self.messages += 1
        result: dict[str, RcptOutcome] = {}
        try:
            try:
                await c.mail(env.sender, options=opts, encoding=enc)
            except aiosmtplib.SMTPResponseException as exc:
                if reused and exc.code == 421:
                    # The server closed the idle cached session (RFC 5321 3.8): not this message's fault.
                    self.alive = False
                    c.close()
                    raise StaleSession(self.host) from None
                await self._rset()
                return all_same(env, outcome_of(exc.code, exc.message, self.host, self.tls))
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                if reused:
                    self.alive = False
                    c.close()
                    raise StaleSession(self.host) from exc
                raise
            accepted = []
            for r in env.recipients:
                ropts = []
                if dsn and r.notify:
                    ropts.append(f"NOTIFY={r.notify}")
                if dsn and r.orcpt:
                    kind, _, addr = r.orcpt.partition(";")
                    ropts.append(f"ORCPT={kind};{xtext_encode(addr)}")
                try:
                    await c.rcpt(r.address, options=ropts, encoding=enc)
                    accepted.append(r)
                except aiosmtplib.SMTPResponseException as exc:
                    result[r.address] = outcome_of(exc.code, exc.message, self.host, self.tls)
            if not accepted:
                await self._rset()
                return result
            try:
                resp = await _data(c, env.data)
                code, message = resp.code, resp.message
            except aiosmtplib.SMTPResponseException as exc:
                code, message = exc.code, exc.message
            for r in accepted:
                # Only a recipient whose NOTIFY went along hands its success report over to the remote.
                result[r.address] = outcome_of(code, message, self.host, self.tls, dsn=dsn and r.notify is not None)
            return result
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self.alive = False
            c.close()
            broken = RcptOutcome(TRANSIENT, f"{self.host}: {_describe_exc(exc)}", "4.4.2", self.host, self.tls)
            # Replies already given (a 550 to one RCPT) stand; only the undecided recipients are retried.
            return {r.address: result.get(r.address, broken) for r in env.recipients}

    async def _rset(self) -> None:
        try:
            await self.client.rset()
        except (aiosmtplib.SMTPException, OSError):
            self.alive = False
            self.client.close()

    def abort(self) -> None:
        self.alive = False
        self.client.close()

    async def close(self) -> None:
        if self.alive and self.client.is_connected:
            try:
                await self.client.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError):
                pass
        self.client.close()
        self.alive = False


async def _data(c: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
    """DATA for a message as we store it: CRLF lines only, so dot-stuffing (RFC 5321 4.5.2) is
    all that is left to do, in one replace. aiosmtplib's data() runs two regular expressions
    over every message (a fifth of the delivery process's CPU); anything unusual still goes there."""
    if not data.endswith(b"\r\n") or not data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"):
        return await c.data(data)
    start = await c.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert c.protocol is not None
    c.protocol.write(stuffed)  # the reply cannot arrive before read_response arms itself: no await between
    resp = await c.protocol.read_response(timeout=c.timeout)
    if resp.code != 250:
        raise aiosmtplib.SMTPDataError(resp.code, resp.message)
    return resp
