"""A small authoritative DNS server for tests, built on dnspython.

The relay resolves MX, A/AAAA and DKIM TXT records with dnspython's async
resolver.  Mocking the resolver would skip the code paths most likely to go
wrong (rcode handling, timeouts, truncation and TCP fallback), so tests point
the relay at this server instead via ``dns.nameservers = [server.address]``.

The server runs in its own thread with its own sockets, not on the caller's
event loop: a sync test can use it, and an async test that blocks its loop
(or the relay's loop under test) cannot stall the server.

    with DNSServer({"example.com": [("MX", "10 mx1.example.com.")],
                    "mx1.example.com": [("A", "127.0.0.1")]}) as dns_server:
        config.dns.nameservers = [dns_server.address]
        dns_server.servfail.add("example.com")  # answer SERVFAIL from now on

Behaviour, chosen to look like a real authoritative server:

* AA is set; RA is not.  Only class IN; other classes get REFUSED and
  opcodes other than QUERY get NOTIMP.
* Existing name, no records of the asked type: NOERROR, empty answer (NODATA).
  Absent name: NXDOMAIN, except ancestors of an existing name (empty
  non-terminals), which are NODATA as RFC 8020 requires.  No SOA is sent in
  the authority section; dnspython's resolver does not need one.
* Records are sent in the order given, not shuffled.
* CNAMEs are followed inside the served data.  ANY returns every record set.
* UDP answers larger than 512 bytes (or the EDNS payload size the query
  advertises) are sent empty with TC set, so the client retries over TCP;
  that is how a large DKIM key is fetched in real life.
* Undecodable packets are dropped silently; nothing a client sends can kill
  the server thread.
* Names in ``servfail`` get SERVFAIL; names in ``drop`` get no answer at all,
  which a client sees as a timeout.  Both match exact names only.

Every decoded query is appended to ``queries``, including dropped and
SERVFAIL ones and the TCP retry after a truncated UDP answer, so a test can
count what the client really sent.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.txtbase
import dns.rrset
import dns.tokenizer

__all__ = ["DNSServer"]

log = logging.getLogger(__name__)

# The classic DNS-over-UDP limit (RFC 1035), used when a query has no EDNS.
_UDP_LIMIT = 512
# A TXT character-string is at most 255 octets (a one-octet length prefix).
_TXT_CHUNK = 255
# Stop following CNAMEs after this many hops, so a loop cannot hang a query.
_MAX_CNAME_HOPS = 8
_BIND_ATTEMPTS = 10

Records = dict[int, list[dns.rdata.Rdata]]


def _to_name(name: str) -> dns.name.Name:
    """Return *name* as an absolute name; a trailing dot is optional.

    dns.name.Name compares and hashes case-insensitively, so names used as
    dictionary keys need no lowercasing.
    """
    return dns.name.from_text(name.strip() or ".", origin=dns.name.root)


def _name_text(name: dns.name.Name) -> str:
    """Lowercase text of *name* without the final dot ("" for the root)."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def _chunk(value: bytes) -> list[bytes]:
    if not value:
        return [b""]
    return [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)]


def _txt_strings(text: str) -> list[bytes]:
    """Split TXT rdata text into character-strings of at most 255 octets.

    Quoted input ('"a" "b"') keeps the given strings, and any string over 255
    octets is split, because zone-file syntax would reject it but test
    authors naturally paste a whole DKIM key as one string.  Unquoted input
    is taken verbatim as one value: zone-file parsing would split it at
    spaces and cut it at the first ';', mangling "v=DKIM1; k=rsa; p=...".
    """
    if not text.lstrip().startswith('"'):
        return _chunk(text.encode())
    strings: list[bytes] = []
    tok = dns.tokenizer.Tokenizer(text)
    while True:
        token = tok.get()
        if token.is_eol_or_eof():
            break
        if not (token.is_quoted_string() or token.is_identifier()):
            raise dns.exception.SyntaxError(f"unexpected token {token.value!r}")
        strings.extend(_chunk(token.unescape_to_bytes().value))
    if not strings:
        raise dns.exception.SyntaxError("empty TXT rdata")
    return strings


def _parse_rdata(rdtype_text: str, text: str) -> tuple[int, dns.rdata.Rdata]:
    """Parse one record; errors surface as ValueError in the test's thread.

    Names inside rdata are made absolute ("mx1.example.com" without a dot
    means "mx1.example.com."), since there is no zone origin to append.
    """
    try:
        rdtype = dns.rdatatype.from_text(rdtype_text.strip())
        rdclass = dns.rdataclass.IN
        if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
            cls = dns.rdata.get_rdata_class(rdclass, rdtype)
            assert issubclass(cls, dns.rdtypes.txtbase.TXTBase)
            return rdtype, cls(rdclass, rdtype, _txt_strings(text))
        rdata = dns.rdata.from_text(
            rdclass, rdtype, text, origin=dns.name.root, relativize=False
        )
        return rdtype, rdata
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"bad {rdtype_text} record {text!r}: {exc}") from exc


class DNSServer:
    """Authoritative DNS server on an ephemeral UDP+TCP port; see module doc."""

    def __init__(
        self,
        zones: dict[str, list[tuple[str, str]]] | None = None,
        *,
        host: str = "127.0.0.1",
        ttl: int = 60,
    ) -> None:
        self.host = host
        self.ttl = ttl
        self.port = 0
        # Tests mutate these directly; entries are normalised per query.
        self.servfail: set[str] = set()
        self.drop: set[str] = set()
        self.queries: list[tuple[str, str]] = []

        self._lock = threading.Lock()
        self._zones: dict[dns.name.Name, Records] = {}
        for name, records in (zones or {}).items():
            owner = _to_name(name)
            data = self._zones.setdefault(owner, {})
            for rdtype_text, text in records:
                rdtype, rdata = _parse_rdata(rdtype_text, text)
                data.setdefault(rdtype, []).append(rdata)

        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- public API ---------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` as the relay's ``dns.nameservers`` config expects."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def start(self) -> DNSServer:
        if self._thread is not None:
            raise RuntimeError("DNSServer already started")
        self._udp, self._tcp = self._bind()
        self.port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._serve, name=f"dns-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        # The serving thread closes its own sockets on exit; these are ours.
        self._wake_w.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set(self, name: str, rdtype: str, values: list[str]) -> None:
        """Replace the *rdtype* records of *name*; [] removes them (NODATA).

        The name is created if absent and stays present when its last
        records go; use remove() to make it NXDOMAIN.
        """
        owner = _to_name(name)
        parsed = [_parse_rdata(rdtype, value) for value in values]
        code = dns.rdatatype.from_text(rdtype.strip())
        with self._lock:
            data = self._zones.setdefault(owner, {})
            if parsed:
                data[code] = [rdata for _, rdata in parsed]
            else:
                data.pop(code, None)

    def remove(self, name: str) -> None:
        """Remove *name* and all its records, so it answers NXDOMAIN."""
        with self._lock:
            self._zones.pop(_to_name(name), None)

    def __repr__(self) -> str:
        state = "running" if self._thread and not self._stopping else "stopped"
        return f"<DNSServer {self.address} {state}>"

    # -- sockets ------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        last_error: OSError | None = None
        # The kernel picks a free UDP port, but another process may hold the
        # same number for TCP; then try a fresh UDP port.
        for _ in range(_BIND_ATTEMPTS):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, 0))
                port = udp.getsockname()[1]
                # Lets a quick restart reuse a port still in TIME_WAIT.
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(16)
            except OSError as exc:
                last_error = exc
                udp.close()
                tcp.close()
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError(f"could not bind UDP and TCP to one port: {last_error}")

    def _serve(self) -> None:
        assert self._udp and self._tcp and self._wake_r
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        if key.data == "udp":
                            self._on_udp(sock)
                        elif key.data == "accept":
                            self._on_accept(sock, sel, buffers)
                        elif key.data == "tcp":
                            self._on_tcp(sock, sel, buffers)
                    except Exception:  # never let one packet kill the server
                        log.exception("DNSServer: error handling %s", key.data)
        finally:
            for sock in list(buffers):
                sock.close()
            sel.close()
            self._udp.close()
            self._tcp.close()
            self._wake_r.close()

    def _on_udp(self, sock: socket.socket) -> None:
        try:
            data, peer = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # e.g. ECONNREFUSED from an ICMP error for an earlier reply.
            return
        wire = self._respond(data, tcp=False)
        if wire is not None:
            try:
                sock.sendto(wire, peer)
            except OSError:
                pass

    def _on_accept(
        self,
        sock: socket.socket,
        sel: selectors.BaseSelector,
        buffers: dict[socket.socket, bytearray],
    ) -> None:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        # Blocking with a timeout: reads happen only after select() says the
        # socket is readable, and a client that stops reading cannot block
        # sendall() (and so the whole server) for long.
        conn.settimeout(2.0)
        buffers[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ, "tcp")

    def _on_tcp(
        self,
        conn: socket.socket,
        sel: selectors.BaseSelector,
        buffers: dict[socket.socket, bytearray],
    ) -> None:
        try:
            chunk = conn.recv(65535)
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(conn)
            buffers.pop(conn, None)
            conn.close()
            return
        buf = buffers[conn]
        buf += chunk
        # DNS over TCP: each message carries a two-octet length prefix.
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            wire = self._respond(message, tcp=True)
            if wire is not None:
                try:
                    conn.sendall(len(wire).to_bytes(2, "big") + wire)
                except OSError:
                    sel.unregister(conn)
                    buffers.pop(conn, None)
                    conn.close()
                    return

    # -- answering ----------------------------------------------------------

    def _respond(self, data: bytes, *, tcp: bool) -> bytes | None:
        """Wire-format reply to *data*, or None to stay silent."""
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None  # malformed: ignore, as the brief for tests requires
        if query.flags & dns.flags.QR:
            return None  # a response, not a query
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()

        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self.queries.append((_name_text(qname), dns.rdatatype.to_text(qtype)))

        # set() copies atomically under the GIL even if a test adds names
        # concurrently; iterating the live set could raise.
        if qname in {_to_name(n) for n in set(self.drop)}:
            return None
        if qname in {_to_name(n) for n in set(self.servfail)}:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()

        rcode, answer = self._lookup(qname, qtype)
        response.set_rcode(rcode)
        response.answer.extend(answer)
        return self._to_wire(query, response, tcp=tcp)

    def _lookup(
        self, qname: dns.name.Name, qtype: int
    ) -> tuple[int, list[dns.rrset.RRset]]:
        answer: list[dns.rrset.RRset] = []
        name = qname
        with self._lock:
            for _ in range(_MAX_CNAME_HOPS):
                data = self._zones.get(name)
                if data is None:
                    # Empty non-terminal: exists because a descendant does.
                    if any(owner.is_subdomain(name) for owner in self._zones):
                        return dns.rcode.NOERROR, answer
                    return dns.rcode.NXDOMAIN, answer
                if qtype == dns.rdatatype.ANY:
                    for rdtype, rdatas in data.items():
                        answer.append(self._rrset(name, rdtype, rdatas))
                    return dns.rcode.NOERROR, answer
                if qtype in data:
                    answer.append(self._rrset(name, qtype, data[qtype]))
                    return dns.rcode.NOERROR, answer
                cname = data.get(dns.rdatatype.CNAME)
                if not cname:
                    return dns.rcode.NOERROR, answer  # NODATA
                answer.append(self._rrset(name, dns.rdatatype.CNAME, cname))
                name = cname[0].target  # type: ignore[attr-defined]
        return dns.rcode.NOERROR, answer

    def _rrset(
        self, name: dns.name.Name, rdtype: int, rdatas: Iterable[dns.rdata.Rdata]
    ) -> dns.rrset.RRset:
        return dns.rrset.from_rdata_list(name, self.ttl, list(rdatas))

    @staticmethod
    def _to_wire(
        query: dns.message.Message, response: dns.message.Message, *, tcp: bool
    ) -> bytes:
        if tcp:
            limit = 65535
        elif query.edns >= 0:
            limit = max(_UDP_LIMIT, min(query.payload, 65535))
        else:
            limit = _UDP_LIMIT
        try:
            # dnspython shuffles records by default (round-robin); keep the
            # given order so tests are reproducible and can feed the relay
            # deliberately unsorted MX preferences.
            return response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            # Send no partial data: an empty answer with TC makes every
            # resolver, dnspython included, retry the query over TCP.
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)
