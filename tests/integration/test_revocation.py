"""Revocation reaches open sessions: a deleted or reset credential, or a removed domain, is refused
at the next MAIL FROM of a session that logged in before the change (issue 12, part 5)."""
from __future__ import annotations

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import authed, start_relay

NEW_PASSWORD = "a completely new password 9"


@pytest.fixture
def relay(tmp_path):
    inst = start_relay(tmp_path, config={"credentials": {"verify_cache_ttl": 3600}})
    yield inst
    inst.stop()


def send_one(c, subject: str) -> None:
    assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
    assert c.cmd("RCPT TO:<bob@example.net>").code == 250
    assert c.cmd("DATA").code == 354
    r = c.cmd(f"Subject: {subject}\r\n\r\nbody\r\n.")
    assert r.code == 250, r


@pytest.mark.parametrize("change, expected", [
    (("user", "delete", USER), replies.CREDENTIAL_REVOKED),
    (("domain", "remove", "mg.example.com", "--force"), replies.CREDENTIAL_REVOKED),
    (("user", "reset-password", USER, "--password-stdin"), replies.CREDENTIAL_CHANGED),
], ids=["user-delete", "domain-remove", "password-reset"])
def test_change_applies_at_the_next_mail_of_every_open_session(relay, change, expected):
    sessions = [authed(relay, source=f"127.0.10.{i + 1}") for i in range(3)]
    try:
        for i, c in enumerate(sessions):
            send_one(c, f"before-{i}")
        relay.cli(*change, input=NEW_PASSWORD + "\n", check=True)
        for c in sessions:
            r = c.cmd(f"MAIL FROM:<{USER}>")
            assert r.is_(expected), r
            # The login is gone for good in this session: no transaction without a new AUTH.
            assert c.cmd(f"MAIL FROM:<{USER}>").is_(replies.AUTH_REQUIRED)
            assert c.cmd("RCPT TO:<bob@example.net>").code >= 500
    finally:
        for c in sessions:
            c.close()
    # The line is logged before the reply is sent, but the harness reads the log in a thread of
    # its own: wait for the third (a full suite on 2 cores once saw 2 of 3 at this point).
    assert relay.wait_event("auth_revoked", count=3, user=USER)
    assert len(relay.events_named("auth_revoked", user=USER)) == 3
    subjects = [r["id"] for r in relay.queued()]
    assert len(set(subjects)) == 3  # only the three messages sent before the change


def test_after_a_reset_the_same_session_may_log_in_again_with_the_new_password(relay):
    with authed(relay) as c:
        send_one(c, "before")
        relay.cli("user", "reset-password", USER, "--password-stdin", input=NEW_PASSWORD + "\n", check=True)
        assert c.cmd(f"MAIL FROM:<{USER}>").is_(replies.CREDENTIAL_CHANGED)
        assert c.auth_plain(USER, PASSWORD).is_(replies.AUTH_INVALID)
        assert c.auth_plain(USER, NEW_PASSWORD).is_(replies.AUTH_OK)
        send_one(c, "after")


def test_a_rehash_at_login_is_not_taken_for_a_reset(tmp_path):
    """New argon2 parameters: the stored hash is upgraded at login, and the session follows it."""
    inst = start_relay(tmp_path)
    inst.stop()
    inst.config["credentials"]["argon2_time_cost"] = 2  # the hash made at `user add` is now outdated
    inst.write_config()
    inst.start()
    try:
        with authed(inst) as c:
            send_one(c, "one")
            send_one(c, "two")
        with inst.db() as db:
            stored = db.execute("SELECT hash FROM credentials WHERE username = ?", (USER,)).fetchone()[0]
        assert "t=2" in stored  # it was rehashed
    finally:
        inst.stop()
