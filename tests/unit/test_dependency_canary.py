"""Canary for the private internals of our dependencies (issue 12, part 7).

aiosmtpd, aiosmtplib, dkimpy and asyncio are used here in ways their public API does not
promise. pyproject.toml bounds their versions and constraints.txt pins them; when a bump moves
one of these internals, this file fails first and says which one, instead of a session test
failing somewhere in the middle of a TLS handshake.
"""
from __future__ import annotations

import ast
import asyncio
import asyncio.sslproto
import inspect
import textwrap

import pytest

import aiosmtpd.smtp
import aiosmtplib
import aiosmtplib.protocol
import dkim
import dkim.canonicalization


def need(obj, attr: str, why: str) -> object:
    if not hasattr(obj, attr):
        pytest.fail(f"{getattr(obj, '__name__', obj)!s}.{attr} is gone: {why}. Pin the previous version "
                    "in constraints.txt / pyproject.toml, or port the code that uses it.")
    return getattr(obj, attr)


def self_attributes(func) -> set[str]:
    """Names of `self.X` read or written in a function's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}


# ---------------------------------------------------------------- aiosmtpd

# aiosmtpd.SMTP methods relay.server.session.Session still runs (it replaces __init__ and the
# command loop): every attribute they touch must be one Session.__init__ sets.
KEPT_AIOSMTPD = ("connection_made", "connection_lost", "push", "_cb_client_connected", "_set_rset_state",
                 "_create_session")


def test_aiosmtpd_methods_we_keep_still_exist():
    for name in KEPT_AIOSMTPD:
        need(aiosmtpd.smtp.SMTP, name, "relay.server.session.Session relies on aiosmtpd's own implementation")
    need(aiosmtpd.smtp, "sslproto", "the STARTTLS and implicit-TLS switch builds asyncio's SSLProtocol")


def test_aiosmtpd_reads_no_state_our_init_does_not_set():
    from relay.server.session import Session
    ours = self_attributes(Session.__init__)
    known = set(dir(Session))  # methods and properties (ours or aiosmtpd's)
    missing = {}
    for name in KEPT_AIOSMTPD:
        for attr in self_attributes(getattr(aiosmtpd.smtp.SMTP, name)) - ours - known:
            missing.setdefault(attr, []).append(name)
    # Set by the methods themselves before they read it.
    missing.pop("_reader", None), missing.pop("_writer", None)
    assert not missing, (
        f"aiosmtpd's SMTP now uses attributes Session.__init__ does not set (it skips SMTP.__init__): "
        f"{missing}. Set them in Session.__init__ as SMTP.__init__ would.")


def test_aiosmtpd_starttls_switch_internals():
    src = inspect.getsource(aiosmtpd.smtp.SMTP.connection_made)
    for needle, why in (("_original_transport", "detecting the second connection_made after TLS"),
                        ("_reader._transport", "re-pointing the stream reader at the TLS transport"),
                        ("_reader._buffer.clear()", "RFC 3207 discard of pipelined plaintext"),
                        ("_tls_protocol._extra", "session.ssl after the handshake")):
        assert needle in src, f"aiosmtpd SMTP.connection_made no longer does {needle} ({why})"
    assert "_handler_coroutine" in inspect.getsource(aiosmtpd.smtp.SMTP.connection_lost)


# ---------------------------------------------------------------- asyncio

def test_asyncio_sslproto_internals():
    proto = need(asyncio.sslproto, "SSLProtocol", "sessions start TLS on their own transport")
    params = inspect.signature(proto).parameters
    assert "ssl_handshake_timeout" in params, "SSLProtocol(..., ssl_handshake_timeout=) is gone"
    assert isinstance(need(proto, "max_size", "daemon.serve shrinks the 256 KiB read buffer per TLS session"), int)
    src = inspect.getsource(proto.__init__)
    assert "self._app_transport" in src, "SSLProtocol._app_transport (the TLS transport sessions write to) is gone"


async def test_asyncio_stream_reader_internals():
    reader = asyncio.StreamReader()  # on a running loop: after other tests there is no default one
    assert isinstance(need(reader, "_buffer", "aiosmtpd clears it after STARTTLS"), bytearray)
    assert hasattr(reader, "_transport"), "StreamReader._transport is gone (aiosmtpd re-points it after STARTTLS)"
    need(reader, "feed_eof", "Session.eof_received")
    assert isinstance(need(reader, "_limit", "Session._read_data raises it while DATA runs"), int)


# ---------------------------------------------------------------- aiosmtplib

def test_aiosmtplib_protocol_write_and_read_response():
    src = inspect.getsource(aiosmtplib.SMTP.__init__)
    assert "self.protocol" in src, "aiosmtplib.SMTP.protocol is gone (delivery.outbound._data writes DATA to it)"
    need(aiosmtplib.protocol.SMTPProtocol, "write", "delivery.outbound._data sends the dot-stuffed body in one write")
    read = need(aiosmtplib.protocol.SMTPProtocol, "read_response", "delivery.outbound._data reads the DATA reply")
    assert "timeout" in inspect.signature(read).parameters
    assert "self.transport = " in inspect.getsource(aiosmtplib.SMTP), \
        "aiosmtplib.SMTP.transport is gone (delivery.outbound reads the TLS version from it)"


def test_aiosmtplib_flow_control_and_reply_internals():
    """delivery.outbound._data times the body by write progress and keeps an early reply."""
    proto_attrs = self_attributes(aiosmtplib.protocol.SMTPProtocol.__init__) | \
        self_attributes(aiosmtplib.protocol.FlowControlMixin.__init__) | \
        self_attributes(aiosmtplib.protocol.SMTPProtocol.connection_made)
    for attr, why in (("_paused", "a paused writer means the kernel took no more: wait for progress"),
                      ("_response_waiter", "an early reply mid-body ends the transfer"),
                      ("_response_pending", "armed before the body so an early reply is kept")):
        assert attr in proto_attrs, f"aiosmtplib SMTPProtocol.{attr} is gone: {why}"
    need(aiosmtplib.protocol.FlowControlMixin, "_drain_helper", "the progress wait of _data")


# ---------------------------------------------------------------- dkimpy

def test_dkimpy_internals_the_signer_replaces():
    import relay.signing  # noqa: F401 - applies the replacements; they must still have targets
    for attr, why in (("RSASSA_PKCS1_v1_5_sign", "signing.py swaps pure-Python RSA for OpenSSL's"),
                      ("parse_pem_private_key", "signing.py caches parsed keys"),
                      ("DKIM", "the signer")):
        need(dkim, attr, why)
    for attr in ("correct_empty_body", "strip_trailing_lines"):
        need(dkim.canonicalization, attr, "signing.py's fast relaxed body canonicalization")
    need(dkim.canonicalization.Relaxed, "canonicalize_body", "signing.py replaces it")
    # dkimpy must still look these up as module globals at call time, or the swap does nothing.
    module_src = inspect.getsource(dkim)
    assert "RSASSA_PKCS1_v1_5_sign(" in module_src and "parse_pem_private_key(" in module_src
    # signing.signature: dkimpy's own gen_header over our streamed body hash, as its sign() calls it.
    for attr in ("HASH_ALGORITHMS", "CanonicalizationPolicy", "UnparsableKeyError", "KeyFormatError"):
        need(dkim, attr, "signing.signature")
    assert list(inspect.signature(dkim.DKIM.gen_header).parameters)[:6] == \
        ["self", "fields", "include_headers", "canon_policy", "header_name", "pk"], "DKIM.gen_header changed"
    assert "canonicalize_body(self.body)" in inspect.getsource(dkim.DKIM.sign), \
        "DKIM.sign no longer hashes self.body the way signing.signature repeats"
    for attr in ("compress_whitespace", "strip_trailing_whitespace"):
        need(dkim.canonicalization, attr, "signing.RelaxedBodyHash")
    # We set DKIM.body instead of passing the whole message through its parser.
    assert "self.body" in inspect.getsource(dkim.DKIM.sign) or "self.body" in inspect.getsource(dkim.DomainSigner)


def test_constraints_pin_every_dependency_within_its_bounds():
    """constraints.txt (what CI installs) must pin each dependency of pyproject.toml to a version its
    bounds allow: a pin outside them would make `make test` fail to install, or test something else."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {req.specifier}"
    for name in ("aiosmtpd", "aiosmtplib", "dkimpy"):
        req = next(Requirement(s) for s in project["dependencies"] if Requirement(s).name == name)
        assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), f"{name} needs an upper bound"
