"""Tests for tests.support.dns_server: the DNS server the relay's tests rely on.

Queries go through dnspython's real resolvers (sync and async), the same
client code the relay uses, so these tests also pin down what the relay
will see: exception types, record order, TCP fallback for big TXT records.
"""

from __future__ import annotations

import socket
import time

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.support.dns_server import DNSServer

# Base64-looking DKIM key: 400 characters, more than one TXT string holds.
DKIM_400 = "v=DKIM1; k=rsa; p=" + ("MIIBIjANBgkqhkiG9w0BAQEFAAOC" * 15)[:382]
# Too big for a 512-byte UDP reply even on its own: forces TC and TCP retry.
DKIM_1000 = "v=DKIM1; k=rsa; p=" + ("QUFBQUJCQkJDQ0NDRERERA" * 50)[:982]

ZONES = {
    "Example.COM.": [("MX", "20 mx2.example.com."), ("MX", "10 mx1.example.com")],
    "mx1.example.com": [("A", "127.0.0.1"), ("AAAA", "::1")],
    "mx2.example.com": [("A", "127.0.0.2")],
    "nullmx.example": [("MX", "0 .")],
    "sel._domainkey.example.com": [("TXT", DKIM_400)],
    "big._domainkey.example.com": [("TXT", DKIM_1000)],
    "alias.example.com": [("CNAME", "mx1.example.com.")],
}


@pytest.fixture
def server():
    with DNSServer(ZONES) as srv:
        yield srv


def _configure(resolver, srv: DNSServer, lifetime: float):
    resolver.nameservers = [dns.nameserver.Do53Nameserver(srv.host, srv.port)]
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


def sync_resolver(srv: DNSServer, lifetime: float = 2.0) -> dns.resolver.Resolver:
    return _configure(dns.resolver.Resolver(configure=False), srv, lifetime)


def async_resolver(
    srv: DNSServer, lifetime: float = 2.0
) -> dns.asyncresolver.Resolver:
    return _configure(dns.asyncresolver.Resolver(configure=False), srv, lifetime)


def txt_value(answer) -> str:
    (rdata,) = answer
    return b"".join(rdata.strings).decode()


# -- lifecycle ---------------------------------------------------------------


def test_start_binds_udp_and_tcp_on_one_port_and_stop_is_idempotent():
    srv = DNSServer(ZONES)
    assert srv.start() is srv
    try:
        assert srv.port > 0
        assert srv.address == f"127.0.0.1:{srv.port}"
        # Both transports answer on the advertised port.
        query = dns.message.make_query("example.com", "MX")
        assert dns.query.udp(query, srv.host, port=srv.port, timeout=2).answer
        assert dns.query.tcp(query, srv.host, port=srv.port, timeout=2).answer
    finally:
        srv.stop()
    srv.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex((srv.host, srv.port)) != 0


def test_bad_rdata_fails_in_the_callers_thread():
    with pytest.raises(ValueError, match="MX"):
        DNSServer({"example.com": [("MX", "not-a-number mx.example.com.")]})
    srv = DNSServer()
    with pytest.raises(ValueError):
        srv.set("example.com", "A", ["::1"])


# -- answers -----------------------------------------------------------------


def test_mx_order_and_preferences_sync(server):
    answer = sync_resolver(server).resolve("example.com", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in answer] == [
        (20, "mx2.example.com."),
        (10, "mx1.example.com."),  # relative exchange was made absolute
    ]
    assert answer.response.flags & dns.flags.AA
    assert answer.rrset.ttl == 60


@pytest.mark.asyncio
async def test_mx_a_aaaa_async(server):
    resolver = async_resolver(server)
    mx = await resolver.resolve("EXAMPLE.com.", "MX")
    assert sorted(r.preference for r in mx) == [10, 20]
    a = await resolver.resolve("mx1.example.com", "A")
    assert [r.address for r in a] == ["127.0.0.1"]
    aaaa = await resolver.resolve("mx1.example.com", "AAAA")
    assert [r.address for r in aaaa] == ["::1"]


@pytest.mark.asyncio
async def test_null_mx(server):
    answer = await async_resolver(server).resolve("nullmx.example", "MX")
    (rdata,) = answer
    assert rdata.preference == 0
    assert rdata.exchange == dns.name.root


@pytest.mark.asyncio
async def test_cname_is_followed(server):
    answer = await async_resolver(server).resolve("alias.example.com", "A")
    assert answer.canonical_name.to_text() == "mx1.example.com."
    assert [r.address for r in answer] == ["127.0.0.1"]


# -- negative answers and failures -------------------------------------------


def test_nxdomain(server):
    with pytest.raises(dns.resolver.NXDOMAIN):
        sync_resolver(server).resolve("nope.example.com", "MX")


@pytest.mark.asyncio
async def test_nodata_and_empty_non_terminal(server):
    resolver = async_resolver(server)
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("mx2.example.com", "AAAA")
    # "_domainkey.example.com" has no records of its own but has children.
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("_domainkey.example.com", "TXT")
    response = dns.query.udp(
        dns.message.make_query("_domainkey.example.com", "TXT"),
        server.host,
        port=server.port,
        timeout=2,
    )
    assert response.rcode() == dns.rcode.NOERROR and not response.answer


@pytest.mark.asyncio
async def test_servfail(server):
    server.servfail.add("Example.com.")  # matched case- and dot-insensitively
    with pytest.raises(dns.resolver.NoNameservers):
        await async_resolver(server, lifetime=1.0).resolve("example.com", "MX")
    # Other names are unaffected.
    await async_resolver(server).resolve("mx1.example.com", "A")


@pytest.mark.asyncio
async def test_drop_times_out(server):
    server.drop.add("example.com")
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await async_resolver(server, lifetime=0.5).resolve("example.com", "MX")
    assert time.monotonic() - started < 2
    assert ("example.com", "MX") in server.queries


# -- big TXT records ---------------------------------------------------------


@pytest.mark.asyncio
async def test_long_txt_round_trips_as_255_octet_strings(server):
    answer = await async_resolver(server).resolve("sel._domainkey.example.com", "TXT")
    (rdata,) = answer
    assert [len(s) for s in rdata.strings] == [255, 145]
    assert txt_value(answer) == DKIM_400


@pytest.mark.asyncio
async def test_oversized_txt_falls_back_to_tcp(server):
    name = "big._domainkey.example.com"
    query = dns.message.make_query(name, "TXT")
    truncated = dns.query.udp(query, server.host, port=server.port, timeout=2)
    assert truncated.flags & dns.flags.TC
    assert not truncated.answer

    server.queries.clear()
    answer = await async_resolver(server).resolve(name, "TXT")
    assert txt_value(answer) == DKIM_1000
    # One UDP attempt, answered with TC, then the same query over TCP.
    assert server.queries == [(name, "TXT"), (name, "TXT")]


def test_edns_payload_raises_udp_limit(server):
    query = dns.message.make_query(
        "big._domainkey.example.com", "TXT", use_edns=0, payload=4096
    )
    response = dns.query.udp(query, server.host, port=server.port, timeout=2)
    assert not response.flags & dns.flags.TC
    assert b"".join(response.answer[0][0].strings).decode() == DKIM_1000


def test_txt_given_as_quoted_strings():
    first, second = "a" * 200, "b;c " * 50
    zones = {
        "multi.example": [("TXT", f'"{first}" "{second}"')],
        "long.example": [("TXT", '"' + "x" * 300 + '"')],
    }
    with DNSServer(zones) as srv:
        (multi,) = sync_resolver(srv).resolve("multi.example", "TXT")
        (long_txt,) = sync_resolver(srv).resolve("long.example", "TXT")
    # Given strings are kept as they are; only an over-long one is split.
    assert multi.strings == (first.encode(), second.encode())
    assert long_txt.strings == (b"x" * 255, b"x" * 45)


# -- runtime changes and the query log ---------------------------------------


def test_set_and_remove_at_runtime(server):
    resolver = sync_resolver(server)
    server.set("new.example", "MX", ["5 mx1.example.com."])
    assert [r.preference for r in resolver.resolve("new.example", "MX")] == [5]

    server.set("example.com", "MX", ["30 mx3.example.com."])
    assert [r.preference for r in resolver.resolve("example.com", "MX")] == [30]

    server.set("example.com", "MX", [])
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("example.com", "MX")

    server.remove("mx1.example.com.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("mx1.example.com", "A")


def test_queries_are_recorded_in_order(server):
    resolver = sync_resolver(server)
    resolver.resolve("EXAMPLE.com.", "MX")
    resolver.resolve("mx1.example.com", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("gone.example", "A")
    assert server.queries == [
        ("example.com", "MX"),
        ("mx1.example.com", "AAAA"),
        ("gone.example", "A"),
    ]


def test_malformed_packets_are_ignored(server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"\x00", (server.host, server.port))
        udp.sendto(b"\xff" * 40, (server.host, server.port))
    with socket.create_connection((server.host, server.port), timeout=2) as tcp:
        tcp.sendall(b"\x00\x05hello")
        # A valid query on the same connection still gets its answer.
        query = dns.message.make_query("example.com", "MX")
        dns.query.send_tcp(tcp, query)
        response, _ = dns.query.receive_tcp(tcp, expiration=time.time() + 2)
        assert response.id == query.id and response.answer
    assert server.queries == [("example.com", "MX")]
    sync_resolver(server).resolve("mx2.example.com", "A")
