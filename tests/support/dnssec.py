"""Real DNSSEC, offline: a zone signed here with dnspython (ECDSAP256SHA256), served by a loopback
authoritative server, validated by Debian's `unbound` run as a subprocess (design 2.4).

    zone = SignedZone("dane.test", {"dane.test": [("MX", "10 mx.dane.test.")],
                                    "mx.dane.test": [("A", "127.0.0.2")],
                                    "_25._tcp.mx.dane.test": [("TLSA", "3 1 1 ab...")]})
    with SignedZoneServer(zone) as auth, Unbound({zone.origin: auth.address},
                                                 anchors=[zone.trust_anchor()]) as unbound:
        config.dns.dnssec_resolver = unbound.address

`SignedZone.tamper(name, rdtype, text)` replaces an RRset's data and keeps its old RRSIG, which
then no longer verifies (unbound: SERVFAIL). `resign()` makes every signature good again.

Only names that exist are asked in these tests: the server sends no NSEC denial proofs, so a
name missing from a signed zone is bogus to unbound (which is fine for what the tests do).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

from .dns_server import DNSServer, _parse_rdata, _to_name

__all__ = ["SignedZone", "SignedZoneServer", "Unbound"]

KSK = 257  # ZONE | SEP


class SignedZone:
    def __init__(self, origin: str, records: dict[str, list[tuple[str, str]]], ttl: int = 60):
        self.origin = origin.rstrip(".").lower()
        self.ttl = ttl
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.dnskey = dns.dnssec.make_dnskey(self.key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256, flags=KSK)
        self.records = {n: list(v) for n, v in records.items()}
        apex = self.records.setdefault(self.origin, [])
        if not any(t == "SOA" for t, _ in apex):
            apex.insert(0, ("SOA", f"ns.{self.origin}. hostmaster.{self.origin}. 1 3600 600 86400 60"))
        if not any(t == "NS" for t, _ in apex):
            apex.append(("NS", f"ns.{self.origin}."))
            self.records.setdefault(f"ns.{self.origin}", []).append(("A", "127.0.0.1"))
        self.zone: dns.zone.Zone
        self.resign()

    def resign(self) -> None:
        origin = dns.name.from_text(self.origin)
        zone = dns.zone.Zone(origin, relativize=False)
        with zone.writer() as txn:
            for name, recs in self.records.items():
                owner = _to_name(name)
                for rdtype_text, text in recs:
                    _, rdata = _parse_rdata(rdtype_text, text)
                    txn.add(owner, self.ttl, rdata)
        dns.dnssec.sign_zone(zone, keys=[(self.key, self.dnskey)], lifetime=86400, dnskey_ttl=self.ttl)
        self.zone = zone

    def tamper(self, name: str, rdtype: str, text: str) -> None:
        """Change an RRset's data behind its RRSIG: a validator must now call it bogus."""
        _, rdata = _parse_rdata(rdtype, text)
        node = self.zone.find_node(_to_name(name))
        rds = node.find_rdataset(dns.rdataclass.IN, rdata.rdtype)
        rds.clear()
        rds.add(rdata, self.ttl)

    def trust_anchor(self) -> str:
        return f'{self.origin}. {self.ttl} IN DNSKEY {self.dnskey.to_text()}'

    def rrsets(self, qname: dns.name.Name, qtype: int, dnssec: bool) -> tuple[int, list[dns.rrset.RRset]]:
        node = self.zone.get_node(qname)
        if node is None:
            return dns.rcode.NXDOMAIN, []
        out = []
        rds = node.get_rdataset(dns.rdataclass.IN, qtype)
        if rds is not None:
            out.append(dns.rrset.from_rdata_list(qname, rds.ttl, list(rds)))
            if dnssec:
                sig = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, qtype)
                if sig is not None:
                    out.append(dns.rrset.from_rdata_list(qname, sig.ttl, list(sig)))
        return dns.rcode.NOERROR, out


class SignedZoneServer(DNSServer):
    """The test DNS server's sockets and thread, answering from a SignedZone (RRSIGs when DO is set)."""

    def __init__(self, zone: SignedZone, host: str = "127.0.0.1"):
        super().__init__({}, host=host)
        self.zone = zone

    def _respond(self, data: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        q = query.question[0]
        with self._lock:
            self.queries.append((q.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(q.rdtype)))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not q.name.is_subdomain(self.zone.zone.origin):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        dnssec = bool(query.ednsflags & dns.flags.DO)
        rcode, rrsets = self.zone.rrsets(q.name, q.rdtype, dnssec)
        response.set_rcode(rcode)
        response.answer.extend(rrsets)
        if not rrsets:
            soa_rcode, soa = self.zone.rrsets(self.zone.zone.origin, dns.rdatatype.SOA, dnssec)
            response.authority.extend(soa)
        return self._to_wire(query, response, tcp=tcp)


class Unbound:
    """`unbound -d` on 127.0.0.1:<free port> with a generated config: a trust anchor per signed
    test zone and a stub zone per served zone; stopped (terminate, then kill) on exit."""

    def __init__(self, stubs: dict[str, str], anchors: list[str] = (), host: str = "127.0.0.1"):
        self.stubs = stubs
        self.anchors = list(anchors)
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="relay-unbound-")
        self.log_path = os.path.join(self.dir, "unbound.log")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _config(self) -> str:
        lines = [
            "server:",
            f"  interface: {self.host}",
            f"  port: {self.port}",
            "  do-ip6: no",
            "  do-daemonize: no",
            '  chroot: ""',
            '  username: ""',
            f'  directory: "{self.dir}"',
            f'  logfile: "{self.log_path}"',
            '  pidfile: ""',
            "  use-syslog: no",
            "  verbosity: 1",
            "  val-log-level: 2",
            "  do-not-query-localhost: no",
            "  qname-minimisation: no",
            "  harden-dnssec-stripped: yes",
            "  cache-max-ttl: 0",
            "  cache-max-negative-ttl: 0",
            "  infra-host-ttl: 0",
            "  serve-expired: no",
            "  access-control: 127.0.0.0/8 allow",
            "  num-threads: 1",
            '  local-zone: "test." nodefault',
            "  module-config: \"validator iterator\"",
        ]
        lines += [f'  trust-anchor: "{a}"' for a in self.anchors]
        for zone, addr in self.stubs.items():
            host, _, port = addr.rpartition(":")
            lines += ["stub-zone:", f'  name: "{zone.rstrip(".")}."', f"  stub-addr: {host}@{port}",
                      "  stub-first: no"]
        return "\n".join(lines) + "\n"

    def start(self) -> "Unbound":
        binary = shutil.which("unbound")
        if binary is None:
            raise RuntimeError("unbound is not installed")
        import socket
        for _ in range(5):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
            conf = os.path.join(self.dir, "unbound.conf")
            with open(conf, "w") as f:
                f.write(self._config())
            self.proc = subprocess.Popen([binary, "-d", "-c", conf], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            if self._wait_ready(10):
                return self
            self.stop()
        raise RuntimeError(f"unbound did not start: {self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            q = dns.message.make_query("version.bind.", "TXT", "CH")
            try:
                dns.query.udp(q, self.host, port=self.port, timeout=0.3)
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.05)
        return False

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Unbound":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
