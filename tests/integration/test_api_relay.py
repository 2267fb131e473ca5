"""The API against the real relay: a credential created over HTTP authenticates on the
submission port (smtplib, STARTTLS); after a reset over HTTP the old password fails at the
next AUTH and the new one works; after a delete AUTH fails. A failed AUTH shows as the
credential's last_failed_login; a message submitted with it is in GET /queue.

The relay runs as its own process (the installed console script); the API runs in this
process on the same database file, as the web admin would in the daemon: the relay's verify
cache is bound to the stored hash, so a change made here applies at its next AUTH.
"""
from __future__ import annotations

import smtplib

import pytest
import requests

from relay import config as config_mod
from tests.support.api_server import ApiServer
from tests.support.relay_instance import wait_until

D = "mg.example.com"
USER = f"app@{D}"


@pytest.fixture
def setup(make_relay):
    inst = make_relay()
    with ApiServer(config_mod.load(inst.config_path)) as api:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {api.add_key('write')}"
        yield inst, api, s


def auth(inst, username: str, password: str) -> bool:
    c = inst.smtp()
    try:
        c.login(username, password)
        return True
    except smtplib.SMTPAuthenticationError:
        return False
    finally:
        try:
            c.quit()
        except smtplib.SMTPException:
            pass


def test_create_reset_delete_over_the_api_then_auth_on_the_submission_port(setup):
    inst, api, s = setup
    assert s.post(f"{api.url}/domains", json={"name": D}, timeout=10).status_code == 201
    r = s.post(f"{api.url}/domains/{D}/credentials", json={"login": "app"}, timeout=10)
    assert r.status_code == 201, r.text
    first = r.json()["password"]
    assert auth(inst, USER, first)

    r = s.put(f"{api.url}/domains/{D}/credentials/{USER}", timeout=10)
    assert r.status_code == 200, r.text
    second = r.json()["password"]
    assert not auth(inst, USER, first)   # the old one fails at the very next AUTH
    assert auth(inst, USER, second)

    # The failed AUTH reaches the credential's row (the relay writes it in batches, within ~1 s).
    def failed_at():
        [c] = s.get(f"{api.url}/domains/{D}/credentials", timeout=10).json()["items"]
        return c["last_failed_login"] and c["last_login"]
    wait_until(failed_at, timeout=10, what="last_failed_login and last_login recorded")

    qid = inst.submit(USER, second, USER, ["bob@example.net"], f"From: {USER}\r\nSubject: api\r\n\r\nhi\r\n")
    page = s.get(f"{api.url}/queue", params={"domain": D}, timeout=10).json()
    assert [m["id"] for m in page["items"]] == [qid]
    m = s.get(f"{api.url}/queue/{qid}", timeout=10).json()
    assert m["auth_user"] == USER and "Subject: api" in m["headers"]

    r = s.delete(f"{api.url}/domains/{D}/credentials/app", timeout=10)
    assert r.status_code == 200 and r.json() == {"deleted": USER}
    assert not auth(inst, USER, second)
    assert [k["username"] for k in s.get(f"{api.url}/domains/{D}/credentials", timeout=10).json()["items"]] == []


def test_message_page_data_every_attempt_with_host_reply_and_tls(make_relay, dns_server, mx_sink):
    """Deferred by the MX once, retried over the API, then delivered: GET /queue/{qid} has both
    attempts with the host that answered, its reply and the TLS in use."""
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    inst = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                      config={"delivery": {"retry_schedule": [3600]}})
    inst.add_user(USER, "correct horse battery staple")
    inst.start()
    mx_sink.data_reply = "451 4.3.0 try again later"
    with ApiServer(config_mod.load(inst.config_path)) as api:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {api.add_key('write')}"
        qid = inst.submit(USER, "correct horse battery staple", USER, ["bob@example.net"],
                          f"From: {USER}\r\nSubject: twice\r\n\r\nhi\r\n")

        def attempts(n):
            def check():
                m = s.get(f"{api.url}/queue/{qid}", timeout=10).json()
                return m if len([a for a in m["attempts"] if a["recipient"]]) >= n else None
            return check
        m = wait_until(attempts(1), timeout=20, what="the first attempt in the message's history")
        assert m["state"] == "deferred" and m["recipients"][0]["state"] == "deferred"
        mx_sink.data_reply = None
        assert s.post(f"{api.url}/queue/{qid}/retry", timeout=10).json() == {"id": qid, "due_now": 1}
        m = wait_until(attempts(2), timeout=20, what="the second attempt")
        first, second = [a for a in m["attempts"] if a["recipient"]]
        assert (first["event"], first["reply"]) == ("deferred", "451 4.3.0 try again later")
        assert second["event"] == "delivered" and second["reply"].startswith("250")
        for a in (first, second):
            assert a["recipient"] == "bob@example.net" and a["host"] and a["tls"], a
        assert mx_sink.wait_for(1)
