"""Bodies read from a spool file in pieces: the pieces, dot-stuffing across their borders and the
streamed DKIM body hash are exactly what the whole-message code computes (dkimpy's own relaxed
canonicalization, `outbound._stuffed`), wherever the borders fall."""
from __future__ import annotations

import asyncio
import hashlib
import random

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay import policy, signing
from relay.delivery import outbound
from relay.dkim_keys import DKIMKey
from relay.spool import Body

# Lines that stress the rules: trailing WSP, runs of WSP, lines of only WSP, dots at line starts,
# empty lines (also at the end of the body), long lines.
LINES = [b"plain text", b"", b"", b".", b"..", b".leading dot", b"trailing space ", b"trailing tab\t",
         b"   ", b"\t", b"a  b\t\tc", b" leading", b"x" * 998, b"." + b"y" * 997, b"tab\tin", b"\xc3\xa9t\xc3\xa9"]


def random_body(rng: random.Random, n: int) -> bytes:
    lines = [rng.choice(LINES) for _ in range(n)]
    tail = rng.choice([b"", b"\r\n", b"\r\n\r\n\r\n", b"   \r\n\t\r\n"])
    return b"".join(line + b"\r\n" for line in lines) + tail


def pieces_of(data: bytes, tmp_path, size: int) -> list[bytes]:
    path = tmp_path / "body"
    path.write_bytes(data)

    async def collect() -> list[bytes]:
        return [p async for p in Body(path=str(path), size=len(data)).chunks(size)]

    return asyncio.run(collect())


def wire_of(body: Body, size: int) -> bytes:
    async def collect() -> bytes:
        return b"".join([p async for p in outbound._wire_pieces(body, size, wire_read=size)])

    return asyncio.run(collect())


@pytest.mark.parametrize("seed", range(25))
def test_pieces_end_at_line_ends_and_join_to_the_file(tmp_path, seed):
    rng = random.Random(seed)
    data = random_body(rng, rng.randint(0, 400))
    size = rng.choice([7, 64, 1000, 4096, 65536])
    pieces = pieces_of(data, tmp_path, size)
    assert b"".join(pieces) == data
    assert all(p.endswith(b"\n") for p in pieces[:-1])


@pytest.mark.parametrize("seed", range(40))
def test_streamed_relaxed_body_hash_equals_dkimpys(tmp_path, seed):
    rng = random.Random(seed)
    data = random_body(rng, rng.randint(0, 300))
    h = signing.RelaxedBodyHash()
    for piece in pieces_of(data, tmp_path, rng.choice([5, 100, 1024, 8192])):
        h.update(piece)
    assert h.digest() == hashlib.sha256(signing._RELAXED_BODY(data)).digest()


@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n", b"  \r\n\t\r\n", b"a\r\n", b"a \r\n\r\n \r\n",
                                  b"a\r\n\r\nb\r\n\r\n"])
def test_streamed_hash_edge_bodies(body):
    for cut in range(len(body) + 1):
        if cut and body[cut - 1:cut] != b"\n" and cut != len(body):
            continue  # pieces end at line ends
        h = signing.RelaxedBodyHash()
        h.update(body[:cut])
        h.update(body[cut:])
        assert h.digest() == hashlib.sha256(signing._RELAXED_BODY(body)).digest(), (body, cut)


@pytest.mark.parametrize("seed", range(30))
def test_dot_stuffing_across_piece_borders_equals_whole_body(tmp_path, seed):
    rng = random.Random(seed)
    data = random_body(rng, rng.randint(1, 300))
    if not data:
        data = b".\r\n"
    path = tmp_path / "body"
    path.write_bytes(data)
    prefix = rng.choice([b"", b"DKIM-Signature: v=1; a=rsa-sha256\r\n"])
    size = rng.choice([3, 17, 256, 1001, 8192])
    got = wire_of(Body(prefix=prefix, path=str(path), size=len(data)), size)
    assert got == outbound._stuffed(prefix + data)


def test_a_dot_line_right_at_a_chunk_border_is_stuffed(tmp_path):
    # 10 bytes a line: the piece border falls exactly before the "." line (and the "..").
    data = b"123456789\r\n" * 5 + b".\r\n" + b"..x\r\n" + b"end\r\n"
    path = tmp_path / "body"
    path.write_bytes(data)
    got = wire_of(Body(path=str(path), size=len(data)), 55)
    assert got == outbound._stuffed(data)
    assert b"\r\n..\r\n...x\r\n" in got


@pytest.mark.parametrize("seed", range(30))
def test_a_wire_file_reads_as_its_content_and_sends_as_it_is(tmp_path, seed):
    # Spool files hold the wire form (dots kept): content readers (DKIM, DSNs) get the content
    # back, and delivery sends exactly what whole-message stuffing of prefix + content gives.
    rng = random.Random(seed)
    content = random_body(rng, rng.randint(1, 300)) or b".\r\n"
    path = tmp_path / "body.wire"
    path.write_bytes(policy.stuff(content))
    size = rng.choice([3, 17, 256, 1001, 8192])
    body = Body(path=str(path), size=path.stat().st_size, wire=True)

    async def content_pieces() -> list[bytes]:
        return [p async for p in body.chunks(size)]

    pieces = asyncio.run(content_pieces())
    assert b"".join(pieces) == content
    assert all(p.endswith(b"\n") for p in pieces[:-1])
    prefix = rng.choice([b"", b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n"])
    signed = Body(prefix=prefix, path=str(path), size=path.stat().st_size, wire=True)
    assert wire_of(signed, size) == outbound._stuffed(prefix + content)


def test_unstuffing_keeps_lines_and_undoes_stuffing():
    for content in [b"", b".\r\n", b"..\r\n", b"a\r\n.b\r\n..c\r\n", b"\r\n.\r\n"]:
        assert policy.unstuff(policy.stuff(content)) == content
    # A client that did not stuff a dot line loses its dot (RFC 5321 4.5.2), as line by line.
    assert policy.unstuff(b".x\r\ny\r\n") == b"x\r\ny\r\n"


@pytest.fixture(scope="module")
def key() -> DKIMKey:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption()).decode()
    import base64
    pub = base64.b64encode(k.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    return DKIMKey("mg.example.com", "s1", "rsa", pem, pub, 0.0, True)


def test_signature_is_dkimpys_own_for_the_same_message(key):
    """Byte for byte what dkim.sign gives over the whole message (same second, same headers)."""
    message = (b"From: a@mg.example.com\r\nTo: b@example.net\r\nSubject: t\r\n\r\n"
               + random_body(random.Random(7), 200))
    for _ in range(3):  # dkimpy stamps t= with the current second: retry across a tick
        ours = signing.sign(message, key)
        theirs = dkim.sign(message, b"s1", b"mg.example.com", key.private_key.encode(),
                           canonicalize=(b"relaxed", b"relaxed"),
                           include_headers=[b"from", b"to", b"subject", b"from"])
        if ours[:len(ours) - len(message)] == theirs:
            break
    assert ours[:len(ours) - len(message)] == theirs
    assert ours.endswith(message)
    assert dkim.verify(ours, dnsfunc=lambda name, timeout=5: f"v=DKIM1; k=rsa; p={key.public_key}".encode())


def test_signer_over_a_spooled_body_verifies(tmp_path, key):
    head = b"From: a@mg.example.com\r\nSubject: big\r\n\r\n"
    body = random_body(random.Random(3), 3000) + b"trailing  \r\n\r\n\r\n"
    data = head + body
    path = tmp_path / "body"
    path.write_bytes(data)

    class Keys:
        async def active(self, domain):
            return key

    async def run() -> bytes:
        sig, selector = await signing.Signer(Keys())("mg.example.com", Body(path=str(path), size=len(data)))
        assert selector == "s1"
        return sig

    sig = asyncio.run(run())
    assert dkim.verify(sig + data, dnsfunc=lambda name, timeout=5: f"v=DKIM1; k=rsa; p={key.public_key}".encode())
