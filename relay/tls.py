"""TLS for the SMTP listeners: server contexts (TLS >= 1.2), self-signed certificates, expiry.

One SSLContext serves every listener. SIGHUP builds a *fresh* context from the files and the
daemon swaps it in only once it loaded: loading a new pair into the live context left it
broken when the pair did not match (a new certificate with the old key: KEY_VALUES_MISMATCH
after the certificate was already replaced), and every handshake failed from then on.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path


class TLSError(Exception):
    pass


# TLS 1.2 suites: Mozilla's "intermediate" profile without the DHE ones (we load no DH
# parameters): ECDHE key exchange (forward secrecy) with AEAD ciphers only. CBC suites
# (LUCKY13) and static-RSA key exchange are not offered. TLS 1.3 suites are all AEAD and
# are configured separately by OpenSSL (its defaults are kept).
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
# CA/Browser Forum limit for publicly trusted certificates since 2020; testssl.sh flags more.
SELF_SIGNED_DAYS = 398


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(TLS12_CIPHERS)
    # Session resumption as Postfix's smtpd does it by default: stateless TLS 1.2 tickets
    # (RFC 5077), no server-side session cache (it would be per process, and memory held for
    # clients that rarely come back) and no TLS 1.3 tickets. A TLS 1.3 ticket can only be sent
    # after the client's Finished, and SMTP clients that probe and quit at once (openssl
    # s_client, which testssl.sh drives) never see it: testssl.sh reported that as a failed
    # resumption test. A full TLS 1.3 handshake costs one ECDHE + one ECDSA signature.
    ctx.num_tickets = 0
    _session_cache_off(ctx)
    load(ctx, cert, key)
    return ctx


_SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_CTRL_GET_SESS_CACHE_MODE = 44, 45
_SSL_SESS_CACHE_OFF, _SSL_SESS_CACHE_SERVER = 0x0, 0x2


def _session_cache_off(ctx: ssl.SSLContext) -> bool:
    """SSL_CTX_set_session_cache_mode(SSL_SESS_CACHE_OFF): Python's ssl module has no call for it.

    Reaches the SSL_CTX through CPython's PySSLContext (its first field after the object
    header, unchanged since 3.x). Only when the mode read back first is OpenSSL's default
    for a server context is anything changed; tests/integration/test_tls_grade.py checks
    that session-ID resumption is refused and ticket resumption works.
    """
    import ctypes
    import _ssl
    try:
        libssl = ctypes.CDLL(_ssl.__file__)  # resolves through _ssl's own libssl
        ctrl = libssl.SSL_CTX_ctrl
    except (OSError, AttributeError):
        return False
    ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ssl_ctx or ctrl(ssl_ctx, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_SERVER:
        return False
    ctrl(ssl_ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    return ctrl(ssl_ctx, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) == _SSL_SESS_CACHE_OFF


def load(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSError(f"cannot read {exc.filename}: file not found") from None
    except PermissionError as exc:
        raise TLSError(f"cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise TLSError(f"certificate {cert} / key {key} unusable: {exc.reason or exc}") from None


def not_after(cert: str) -> float:
    """The leaf certificate's notAfter as Unix time (the first PEM block is the leaf)."""
    from cryptography import x509
    try:
        leaf = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError) as exc:
        raise TLSError(f"certificate {cert} unreadable: {exc}") from None
    return leaf.not_valid_after_utc.timestamp()


def client_context(verify: bool) -> ssl.SSLContext:
    """Outbound: verify=False is opportunistic TLS (RFC 7435), as MTAs do by default."""
    if verify:
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """'using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)' for Received and logs."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if not cipher:
        return None
    name, version, bits = cipher
    return f"using {ssl_object.version() or version} with cipher {name} ({bits}/{bits} bits)"


def write_self_signed(cert_path: str, key_path: str, hostname: str, days: int = SELF_SIGNED_DAYS) -> None:
    """Create a self-signed certificate for `hostname` (key mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = []
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        sans.append(x509.DNSName(hostname))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # Backdated a little for clients with a slow clock; the whole span stays `days`.
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now - datetime.timedelta(minutes=5) + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    for p in (cert_path, key_path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file; an old key may have been 0644
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))


def take_over(transport: object, ssl_protocol: object, early: bytes = b"") -> None:
    """A server-side TLS protocol (asyncio's SSLProtocol) takes a plain transport over and gets
    the bytes the plain protocol already read. uvloop starts reading as soon as a connection is
    made, before a task's first step can switch protocols, so on an implicit-TLS port the
    ClientHello may already have been read (asyncio's loop starts reading one callback later)."""
    transport.set_protocol(ssl_protocol)  # type: ignore[attr-defined]
    ssl_protocol.connection_made(transport)  # type: ignore[attr-defined]
    while early:
        buf = ssl_protocol.get_buffer(len(early))  # type: ignore[attr-defined]
        n = min(len(buf), len(early))
        buf[:n] = early[:n]
        ssl_protocol.buffer_updated(n)  # type: ignore[attr-defined]
        early = early[n:]
