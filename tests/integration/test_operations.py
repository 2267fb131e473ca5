"""Operations: metrics endpoint, dashboard/alert files, systemd unit, sd_notify, SIGHUP and SIGTERM."""
from __future__ import annotations

import json
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, USER
from tests.support import tools
from tests.support.raw_smtp import metric
from tests.support.relay_instance import client_tls_context

ROOT = Path(__file__).resolve().parents[2]


def _metric_names_used() -> set[str]:
    text = (ROOT / "contrib" / "prometheus-alerts.yml").read_text()
    dash = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set(re.findall(r"\brelay_[a-z_]+", text + "\n".join(exprs)))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_dashboard_and_alerts_use_only_exported_metrics(relay):
    exported = set(re.findall(r"^# TYPE (relay_[a-z_]+)", relay.metrics_text(), re.M))
    # Counters are exported as NAME_total and typed as NAME.
    exported |= {n + "_total" for n in exported}
    used = _metric_names_used()
    assert used, "no metrics found in contrib files"
    assert used <= exported, f"used but not exported: {sorted(used - exported)}"


@tools.needs("promtool", reason="CI installs Debian's prometheus")
def test_alert_rules_pass_promtool():
    cp = subprocess.run(["promtool", "check", "rules", str(ROOT / "contrib" / "prometheus-alerts.yml")],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_metrics_count_traffic_without_addresses(relay):
    relay.submit(USER, PASSWORD, USER, ["someone@example.net"], b"Subject: m\r\n\r\nx\r\n")
    s = relay.smtp()
    with pytest.raises(smtplib.SMTPAuthenticationError):
        s.login(USER, "wrong password here")
    s.quit()
    text = relay.metrics_text()
    assert re.search(r'^relay_messages_accepted_total\{kind="submission"\} 1\.0$', text, re.M)
    assert re.search(r'^relay_auth_attempts_total\{mechanism="PLAIN",result="failure"\} 1\.0$', text, re.M)
    assert re.search(r'^relay_auth_attempts_total\{mechanism="PLAIN",result="success"\} 1\.0$', text, re.M)
    assert re.search(r'^relay_accept_duration_seconds_count 1\.0$', text, re.M)
    assert re.search(r'^relay_build_info\{node="[^"]+",version="[^"]+"\} 1\.0$', text, re.M)
    # Low cardinality: never a username or an address as a label value.
    assert "example.net" not in text and "mg.example.com" not in text


def _unit_for_verify(tmp_path: Path) -> Path:
    unit = (ROOT / "systemd" / "relay.service").read_text()
    exe = Path(sys.executable).parent / "relay"
    unit = unit.replace("/opt/relay/.venv/bin/relay", str(exe))
    p = tmp_path / "relay.service"
    p.write_text(unit)
    return p


@tools.needs("systemd-analyze", reason="CI installs systemd")
def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    unit = _unit_for_verify(tmp_path)
    cp = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                        capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for relay\.service: ([0-9.]+)", cp.stdout)
    assert m, cp.stdout[-500:] + cp.stderr
    assert float(m.group(1)) <= 2.0
    text = unit.read_text()
    for needle in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "User=relay",
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE", "StateDirectory=relay", "/etc/relay/relay.toml"):
        assert needle in text


def test_sd_notify_ready_and_stopping(make_relay, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(20)
    try:
        relay = make_relay(env={"NOTIFY_SOCKET": sock_path})
        assert listener.recv(256) == b"READY=1"
        # Listeners are bound by the time READY=1 is sent.
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            assert c.recv(100).startswith(b"220 relay.test")
        relay.signal(signal.SIGTERM)
        assert listener.recv(256) == b"STOPPING=1"
        assert relay.proc.wait(30) == 0
    finally:
        listener.close()


def _served_cert_serial(port: int) -> int:
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("t")
    s.starttls(context=client_tls_context())
    der = s.sock.getpeercert(binary_form=True)
    s.quit()
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_certificate_and_limits_keeping_sessions(relay):
    before = _served_cert_serial(relay.port)
    open_session = relay.smtp()
    open_session.login(USER, PASSWORD)
    # Replace the certificate and tighten a limit, then SIGHUP.
    assert relay.cli("cert", "selfsigned", "--force", "--hostname", "relay.test").returncode == 0
    relay.config["limits"]["recipients"] = 1
    relay.write_config()
    relay.signal(signal.SIGHUP)
    assert relay.wait_event("reloaded")
    assert _served_cert_serial(relay.port) != before
    # The session opened before the reload still works, and the new limit applies.
    open_session.mail(USER)
    assert open_session.rcpt("a@example.net")[0] == 250
    code, msg = open_session.rcpt("b@example.net")
    assert (code, msg[:5]) == (452, b"4.5.3")
    open_session.quit()


def test_sighup_with_broken_config_keeps_running(relay):
    relay.config["limits"]["recipients"] = "many"
    relay.write_config()
    relay.signal(signal.SIGHUP)
    assert relay.wait_event("reload_failed")
    assert "limits.recipients" in relay.events_named("reload_failed")[0]["error"]
    relay.submit(USER, PASSWORD, USER, ["x@example.net"], b"Subject: still up\r\n\r\nx\r\n")


def test_sigterm_during_traffic_loses_nothing_acknowledged(make_relay, dns_server):
    dns_server.servfail.add("example.net")  # deliveries defer: acknowledged mail must stay queued
    relay = make_relay(start=False, dns=dns_server.address)
    relay.add_user(USER, PASSWORD)
    relay.start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(40):
            if stop.is_set():
                return
            try:
                qid = relay.submit(USER, PASSWORD, USER, [f"r{n}-{i}@example.net"],
                                   f"Subject: load {n}-{i}\r\n\r\nbody\r\n".encode())
            except (smtplib.SMTPException, OSError, AssertionError, ssl.SSLError):
                return  # refused or cut off by the shutdown: not acknowledged, nothing promised
            with lock:
                acked.append(qid)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    idle = relay.smtp()  # an idle session between transactions: told 421 at shutdown
    relay.signal(signal.SIGTERM)
    assert relay.proc.wait(30) == 0
    stop.set()
    for t in threads:
        t.join(30)
    with pytest.raises((smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError)):
        idle.noop()
        idle.noop()
    assert len(acked) >= 10
    # DNS fails temporarily in this test: every acknowledged message must still be queued.
    queued = {r["id"] for r in relay.queued()}
    assert set(acked) <= queued
    assert relay.wait_event("stopped")


def test_log_lines_tell_a_message_story_by_queue_id(make_relay, dns_server, mx_sink):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port)
    relay.add_user(USER, PASSWORD)
    relay.start()
    qid = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], b"Subject: story\r\n\r\nx\r\n")
    assert relay.wait_event("delivery", qid=qid, result="delivered")
    story = [e["event"] for e in relay.events if e.get("qid") == qid]
    assert story[0] == "queued" and "delivery" in story
    delivery = relay.events_named("delivery", qid=qid)[0]
    assert delivery["rcpt"] == "bob@example.net" and delivery["mx"] == "mx.example.net"
    assert delivery["reply"].startswith("250")
    assert relay.events_named("auth", result="success")[0]["user"] == USER
    assert not any(PASSWORD in line for line in relay.raw_log)


def test_logfmt_is_the_default_format(tmp_path):
    from relay import logs
    import logging
    rec = logging.LogRecord("relay", logging.INFO, __file__, 1, "queued", None, None)
    rec.relay_fields = {"event": "queued", "qid": "ABC", "sender": 'a b"c', "evil": "x\ny"}
    line = logs.LogfmtFormatter().format(rec)
    assert "event=queued qid=ABC" in line
    assert 'sender="a b\\"c"' in line
    assert "\n" not in line and 'evil="x\\\\x0ay"' in line


def _cert_not_after(path: str) -> float:
    from cryptography import x509
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc.timestamp()


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_sighup_with_mismatched_certificate_and_key_keeps_the_old_pair_serving(relay, implicit):
    """A new certificate with the old key (the usual renewal slip) used to be loaded into the live
    context: afterwards every handshake failed. Now the old pair keeps serving, one line says so."""
    cert, key = relay.config["tls"]["cert"], relay.config["tls"]["key"]
    before = _served_cert_serial(relay.port)
    assert metric(relay, "relay_tls_certificate_expiry_timestamp_seconds") == _cert_not_after(cert)
    old_key = Path(key).read_bytes()
    assert relay.cli("cert", "selfsigned", "--force", "--hostname", "relay.test").returncode == 0
    new_key = Path(key).read_bytes()
    Path(key).write_bytes(old_key)  # new certificate, old key
    relay.signal(signal.SIGHUP)
    assert relay.wait_event("reload_failed")
    failed = relay.events_named("reload_failed")
    assert len(failed) == 1 and "previous configuration and certificate" in failed[0]["kept"], failed
    assert not relay.events_named("reloaded")
    # Handshakes still succeed, with the old certificate, on both kinds of port.
    assert _served_cert_serial(relay.port) == before
    with relay.smtp(implicit=True) as s:
        assert s.noop()[0] == 250
    assert metric(relay, "relay_reloads_total", result="failed") == 1
    # Put the matching key in place: the next SIGHUP swaps the new pair in.
    Path(key).write_bytes(new_key)
    relay.signal(signal.SIGHUP)
    assert relay.wait_event("reloaded")
    assert _served_cert_serial(relay.port) != before
    with relay.smtp(implicit=implicit) as s:
        assert s.noop()[0] == 250
    assert metric(relay, "relay_tls_certificate_expiry_timestamp_seconds") == _cert_not_after(cert)
