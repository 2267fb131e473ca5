"""Failed-login budgets by network and by username, over real sockets (issue 12, part 2).

Many 127.0.0.x sources stand in for the addresses of one network (auth_ipv4_prefix = 24 groups
them the way auth_ipv6_prefix = 64 groups a /64); the IPv6 grouping itself is unit-tested.
"""
from __future__ import annotations


import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import at_once, b64, connect, metric, start_relay

OTHER = "billing@mg.example.com"
OTHER_PASSWORD = "another long password 7"


@pytest.fixture
def relay(tmp_path, request):
    limits = {"auth_failures": 3, "auth_failure_window": 300, "auth_lockout": 600, "auth_failures_per_network": 8,
              "auth_failures_per_user": 5, "auth_user_window": 3600, "auth_failure_delay": 0.05,
              **getattr(request, "param", {})}
    inst = start_relay(tmp_path, config={"limits": limits}, users={USER: PASSWORD, OTHER: OTHER_PASSWORD})
    yield inst
    inst.stop()


def attempt(relay, source: str, user: str, password: str):
    with connect(relay, source=source).secure() as c:
        return c.auth_plain(user, password)


def test_a_stale_app_does_not_lock_out_the_other_credentials_on_its_address(relay):
    office = "127.0.2.1"
    got = [attempt(relay, office, OTHER, "the password before the reset") for _ in range(10)]
    assert [r.is_(replies.AUTH_INVALID) for r in got].count(True) == 3
    assert all(r.is_(replies.AUTH_LOCKED_USER) for r in got[3:])
    # The stale app is locked out of its own credential, even with the right password...
    assert attempt(relay, office, OTHER, OTHER_PASSWORD).is_(replies.AUTH_LOCKED_USER)
    # ...while the other credential on the same address logs in and sends.
    with connect(relay, source=office).secure() as c:
        c.login()
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
    assert relay.events_named("auth_lockout", client=office, scope="network_user", user=OTHER)


@pytest.mark.parametrize("relay", [{"auth_ipv4_prefix": 24}], indirect=True)
def test_a_network_gets_no_more_guesses_than_one_address(relay):
    got = []
    for i in range(40):  # 40 addresses of 127.0.3.0/24, each guessing other usernames
        got.append(attempt(relay, f"127.0.3.{i + 1}", f"user{i}@mg.example.com", "guess"))
    verified = sum(r.is_(replies.AUTH_INVALID) for r in got)
    assert verified == 8, [str(r) for r in got]  # auth_failures_per_network
    assert all(r.is_(replies.AUTH_INVALID) or r.is_(replies.AUTH_LOCKED) for r in got)
    # Every address of the network is refused, even with a right password; the next /24 is not.
    assert attempt(relay, "127.0.3.200", USER, PASSWORD).is_(replies.AUTH_LOCKED)
    assert attempt(relay, "127.0.4.1", USER, PASSWORD).is_(replies.AUTH_OK)
    assert relay.events_named("auth_lockout", scope="network", network="127.0.3.0/24")


def test_one_username_from_many_networks_is_capped_but_its_familiar_network_works(relay):
    home = "127.0.5.1"
    assert attempt(relay, home, USER, PASSWORD).is_(replies.AUTH_OK)  # makes 127.0.5.1/32 familiar
    got = []
    for i in range(30):  # 30 networks, 2 guesses each at one username
        for _ in range(2):
            got.append(attempt(relay, f"127.0.6.{i + 1}", USER, "guess"))
    assert sum(r.is_(replies.AUTH_INVALID) for r in got) == 5  # auth_failures_per_user an hour
    assert all(r.is_(replies.AUTH_INVALID) or r.is_(replies.AUTH_USER_UNDER_ATTACK) for r in got)
    # The right password from an unfamiliar network is refused while the attack lasts...
    assert attempt(relay, "127.0.7.1", USER, PASSWORD).is_(replies.AUTH_USER_UNDER_ATTACK)
    # ...from the familiar one it works, and other usernames are untouched.
    assert attempt(relay, home, USER, PASSWORD).is_(replies.AUTH_OK)
    assert attempt(relay, "127.0.7.1", OTHER, OTHER_PASSWORD).is_(replies.AUTH_OK)
    assert relay.events_named("auth_lockout", scope="user", user=USER)


def test_pending_verifications_are_bounded_and_the_rest_get_454_at_once(tmp_path):
    # Real argon2 cost (the defaults: ~0.1 s of a core each) and room for only 2 at a time.
    inst = start_relay(tmp_path, config={
        "limits": {"auth_pending": 2, "auth_failure_delay": 0.05, "auth_failures_per_network": 100,
                   "connections_per_ip": 50},
        "credentials": {"argon2_time_cost": 3, "argon2_memory_cost": 65536, "argon2_parallelism": 4}})
    try:
        conns = [connect(inst, source=f"127.0.8.{i + 1}").secure() for i in range(12)]
        try:
            got = at_once(len(conns), lambda i: conns[i].cmd(
                "AUTH PLAIN " + b64(f"\0nobody{i}@mg.example.com\0guess {i}")), timeout=60)
        finally:
            for c in conns:
                c.close()
        replies_got = list(got.values())
        assert len(replies_got) == 12
        busy = [r for r in replies_got if r.is_(replies.AUTH_BUSY)]
        assert busy, [str(r) for r in replies_got]
        assert all(r.is_(replies.AUTH_BUSY) or r.is_(replies.AUTH_INVALID) for r in replies_got)
        assert metric(inst, "relay_auth_attempts_total", result="busy") == len(busy)
        # Busy is not a failure: nobody was locked out by it, and a real login goes through after.
        with connect(inst, source="127.0.8.1").secure() as c:
            assert c.auth_plain().is_(replies.AUTH_OK)
    finally:
        inst.stop()
