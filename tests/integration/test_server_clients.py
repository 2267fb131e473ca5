"""Clients we did not write, against the real relay: swaks, openssl s_client, msmtp, aiosmtplib.

Each external tool is optional here (the test skips and says so, or fails under RELAY_REQUIRE_TOOLS=1) and installed in CI.
"""
from __future__ import annotations

import base64
import shutil
import subprocess
from email.message import EmailMessage

import pytest

from relay import headers
from tests.conftest import PASSWORD, USER
from tests.support import tools
from tests.support.raw_smtp import message_fields, start_relay
from tests.support.relay_instance import client_tls_context


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("clients"))
    yield inst
    inst.stop()


def swaks_can_tls() -> bool:
    if shutil.which("swaks") is None:
        return False
    out = subprocess.run(["swaks", "--support"], capture_output=True, text=True, timeout=30)
    return "=== TLS supported" in out.stdout + out.stderr


needs_swaks = tools.needs("swaks")
needs_openssl = tools.needs("openssl")
needs_msmtp = tools.needs("msmtp")


def new_messages(relay, before: set[str]) -> list[dict]:
    return [m for m in relay.queued() if m["id"] not in before]


# ---------------------------------------------------------------- swaks

def swaks(relay, *extra: str, implicit: bool = False, password: str = PASSWORD,
          to: str = "bob@example.net") -> subprocess.CompletedProcess:
    if not swaks_can_tls():
        tools.missing("swaks cannot do TLS here (needs Net::SSLeay: apt-get install libnet-ssleay-perl)")
    port = relay.ports["implicit" if implicit else "starttls"]
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls-on-connect" if implicit else "--tls",
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", password,
         "--from", USER, "--to", to, "--helo", "swaks.test", "--header", "Subject: from swaks", *extra],
        capture_output=True, text=True, timeout=60)


@needs_swaks
@pytest.mark.parametrize("extra", [(), ("--pipeline",)], ids=["plain", "pipeline"])
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_swaks_submits(relay, extra, implicit):
    before = {m["id"] for m in relay.queued()}
    cp = swaks(relay, *extra, implicit=implicit, to="bob@example.net,carol@example.net")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "<-  250 2.0.0 Ok: queued as" in cp.stdout or "<** " not in cp.stdout
    new = new_messages(relay, before)
    assert sorted(m["rcpt"] for m in new) == ["bob@example.net", "carol@example.net"]
    fields = message_fields(relay.body(new[0]["id"]))
    assert fields[0].startswith(b"Received: from swaks.test ([127.0.0.1])")
    assert b"with ESMTPSA id " + new[0]["id"].encode() in fields[0]
    assert b"Subject: from swaks\r\n" in fields


@needs_swaks
def test_swaks_wrong_password_fails(relay):
    before = {m["id"] for m in relay.queued()}
    cp = swaks(relay, password="not the right password")
    assert cp.returncode != 0
    assert "535 5.7.8" in cp.stdout
    assert not new_messages(relay, before)


# ---------------------------------------------------------------- openssl s_client

def s_client(relay, script: str, *args: str, implicit: bool = False) -> subprocess.CompletedProcess:
    port = relay.ports["implicit" if implicit else "starttls"]
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-crlf", "-quiet", *args]
    if not implicit:
        cmd[2:2] = ["-starttls", "smtp"]
    return subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=60)


def dialogue() -> str:
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    # PIPELINING lets the whole session go in one write; DATA content follows its 354.
    return (f"EHLO openssl.test\nAUTH PLAIN {blob}\nMAIL FROM:<{USER}>\nRCPT TO:<bob@example.net>\nDATA\n"
            "Subject: from openssl\n\nhello\n.\nQUIT\n")


@needs_openssl
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_openssl_s_client_session(relay, implicit):
    before = {m["id"] for m in relay.queued()}
    cp = s_client(relay, dialogue(), implicit=implicit)
    out = cp.stdout
    assert "235 2.7.0" in out, out + cp.stderr
    assert "250 2.0.0 Ok: queued as" in out and "221 2.0.0" in out
    if implicit:
        assert out.startswith("220 relay.test ")
    new = new_messages(relay, before)
    assert len(new) == 1
    parts = headers.split(relay.body(new[0]["id"]))
    assert b"Subject: from openssl\r\n" in parts.fields and parts.body == b"\r\nhello\r\n"


@needs_openssl
def test_openssl_tls_versions(relay):
    ok = s_client(relay, "QUIT\n", "-tls1_2", implicit=True)
    assert "221 2.0.0" in ok.stdout, ok.stderr
    old = s_client(relay, "QUIT\n", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", implicit=True)
    assert old.returncode != 0 and "221" not in old.stdout
    old = s_client(relay, "QUIT\n", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0 and "221" not in old.stdout


# ---------------------------------------------------------------- msmtp

@needs_msmtp
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_msmtp_submits(relay, tmp_path, implicit):
    before = {m["id"] for m in relay.queued()}
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD)
    port = relay.ports["implicit" if implicit else "starttls"]
    cp = subprocess.run(
        ["msmtp", "--host=127.0.0.1", f"--port={port}", "--tls=on",
         f"--tls-starttls={'off' if implicit else 'on'}", "--tls-certcheck=off", "--auth=plain",
         f"--user={USER}", f"--passwordeval=cat {pwfile}", f"--from={USER}", "--domain=msmtp.test",
         "bob@example.net"],
        input=b"Subject: from msmtp\nBcc: secret@example.org\n\nhello\n", capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stderr.decode()
    new = new_messages(relay, before)
    assert [m["rcpt"] for m in new] == ["bob@example.net"]
    body = relay.body(new[0]["id"])
    assert b"secret@example.org" not in body and body.endswith(b"\r\n\r\nhello\r\n")


# ---------------------------------------------------------------- aiosmtplib (async client library)

@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_aiosmtplib_submits(relay, implicit):
    aiosmtplib = pytest.importorskip("aiosmtplib")
    before = {m["id"] for m in relay.queued()}
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = USER, "bob@example.net", "from aiosmtplib"
    msg.set_content("héllo wörld\n")
    errors, response = await aiosmtplib.send(
        msg, hostname="127.0.0.1", port=relay.ports["implicit" if implicit else "starttls"],
        use_tls=implicit, start_tls=not implicit, tls_context=client_tls_context(),
        username=USER, password=PASSWORD, timeout=10)
    assert errors == {} and response.startswith("2.0.0 Ok: queued as")
    new = new_messages(relay, before)
    assert [m["id"] for m in new] == [response.rsplit(" ", 1)[-1]]
