"""Every scripted SMTP dialog under tests/dialogs/, played against the real relay process.

One relay for the module, reached over real sockets (STARTTLS and implicit TLS ports), with a
loopback DNS server and a recording MX sink so a dialog can follow its message to the wire.
The format and the checks made on every reply are documented in tests/support/dialog.py.
Dialogs that prove a known relay bug carry an `XFAIL:` header and run as strict xfail.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.dialog import BARE_CR, BARE_LF, DialogRunner, load_all
from tests.support.dns_server import DNSServer
from tests.support.mx_sink import MXSink
from tests.support.relay_instance import RelayInstance

DIALOGS = load_all(Path(__file__).resolve().parent.parent / "dialogs")
SENDER_DOMAIN = USER.rpartition("@")[2]


@pytest.fixture(scope="module")
def peers():
    with DNSServer({}) as dns, MXSink() as sink:
        dns.set("mx.example.net", "A", ["127.0.0.1"])
        dns.set("example.net", "MX", ["10 mx.example.net."])
        dns.set(SENDER_DOMAIN, "MX", ["10 mx.example.net."])  # bounces come back to the sink too
        yield dns, sink


@pytest.fixture(scope="module")
def dialog_relay(peers, tmp_path_factory):
    dns, sink = peers
    inst = RelayInstance(tmp_path_factory.mktemp("dialogs"), dns=dns.address, mx_port=sink.port, config={
        # Small enough that an oversize dialog is a few lines; lockout out of the way of the AUTH
        # dialogs (the lockout has its own test in test_overload.py).
        "limits": {"message_size": 20_000, "auth_failures": 1000},
    })
    inst.add_user(USER, PASSWORD)
    inst.start()
    yield inst
    inst.stop()
    log = "\n".join(inst.raw_log)
    # Whatever the dialogs did, nothing unexpected went to the MX (bounces are checked too).
    for m in sink.messages:
        assert not BARE_LF.search(m.data) and not BARE_CR.search(m.data), m.data[:300]
    assert "Traceback" not in log or any(d.xfail for d in DIALOGS), log


def _param(d):
    marks = [pytest.mark.xfail(strict=True, reason=d.xfail)] if d.xfail else []
    return pytest.param(d, id=d.name, marks=marks)


def test_dialogs_exist():
    names = {d.name for d in DIALOGS}
    assert len(DIALOGS) >= 30
    for must in ("smuggle_lf_dot_lf", "relay_battery_authenticated_percent_and_quotes",
                 "starttls_pipelined_mail_is_discarded", "recipient_limit", "oversize_with_fake_dots"):
        assert must in names


@pytest.mark.parametrize("dialog", [_param(d) for d in DIALOGS])
def test_dialog(dialog, dialog_relay, peers):
    _dns, sink = peers
    DialogRunner(dialog_relay, sink, USER, PASSWORD).run(dialog)


# ---------------------------------------------------------------- the runner's own checks bite

def test_runner_rejects_what_the_relay_must_never_send():
    from tests.support.dialog import DialogError, Reply, check_reply
    check_reply(Reply(250, ["2.1.0 Sender ok"]), "relay.test")
    check_reply(Reply(250, ["relay.test", "PIPELINING"]), "relay.test")
    check_reply(Reply(354, ["End data with <CR><LF>.<CR><LF>"]), "relay.test")
    for bad in (Reply(250, ["Ok"]),                                   # no enhanced status
                Reply(550, ["2.0.0 mismatched class"]),
                Reply(500, ["5.5.2 Error: (OperationalError) database is locked"]),
                Reply(451, ["4.3.0 KeyError in handler"]),
                Reply(451, ["4.3.0 Traceback (most recent call last)"])):
        with pytest.raises(DialogError):
            check_reply(bad, "relay.test")


def test_runner_bytes_expressions_are_literals_only():
    from tests.support.dialog import bytes_expr, expand
    assert bytes_expr('b"a" * 3 + b"\\r\\n"') == b"aaa\r\n"
    for bad in ('__import__("os")', 'b"a".upper()', '"text"', "open('x')"):
        with pytest.raises(ValueError):
            bytes_expr(bad)
    assert expand("AUTH PLAIN {b64:\\x00{user}\\x00pw}", user="u@x.y", password="", i=1) == \
        b"AUTH PLAIN AHVAeC55AHB3"
