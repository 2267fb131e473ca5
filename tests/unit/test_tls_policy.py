"""The outbound TLS policy, without sockets: MTA-STS parsing and MX matching (RFC 8461 3.1, 3.2,
4.1), the level decision and its precedence, the downgrade memory, the steps a level allows."""
from __future__ import annotations

import asyncio
import ssl

import pytest
from hypothesis import given, settings, strategies as st

from relay import config
from relay.delivery.mta_sts import Policy, STSError, mx_matches, parse_policy, parse_txt
from relay.delivery.mx import make_resolver
from relay.delivery.tls_policy import Decision, Level, TLSPolicy, tls_result_of

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.backup.example.com\r\nmax_age: 86400\r\n"


# ------------------------------------------------------------------ TXT record (RFC 8461 3.1)

@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20261126T000000;"], "20261126T000000"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1;"], "x1"),        # other TXT records are ignored
    ([], None),
    (["v=spf1 -all"], None),
    (["v=STSv1; id=x1; ext=whatever;"], "x1"),         # extensions ignored
])
def test_txt_record(records, expected):
    assert parse_txt(records) == expected


@pytest.mark.parametrize("records", [
    ["v=STSv1; id=a;", "v=STSv1; id=b;"],               # two records: no policy (an error)
    ["v=STSv1;"],                                        # no id
    ["v=STSv1; id=;"],
    ["v=STSv1; id=" + "a" * 33],                         # id of 1-32 alphanumerics
    ["v=STSv1; id=a-b"],
    ["v=STSv1x; id=a"],
    ["v=STSv1; junk"],
])
def test_bad_txt_record(records):
    with pytest.raises(STSError):
        parse_txt(records)


# ------------------------------------------------------------------ policy file (RFC 8461 3.2)

def test_policy_parses():
    p = parse_policy(GOOD, "id1", 1000.0)
    assert p == Policy("id1", "enforce", ("mx1.example.com", "*.backup.example.com"), 86400, 1000.0)
    assert p.expires_at == 87400.0
    assert parse_policy(GOOD.replace("\r\n", "\n")).mx == p.mx           # LF accepted
    assert parse_policy(GOOD + "future_key: anything\n").mode == "enforce"  # unknown keys ignored
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n").mx == ()
    assert parse_policy(GOOD.replace("mx1.example.com", "MX1.Example.COM.")).mx[0] == "mx1.example.com"


@pytest.mark.parametrize("text", [
    "",
    "garbage",
    GOOD.replace("STSv1", "STSv2"),
    GOOD.replace("enforce", "strict"),
    GOOD.replace("86400", "0"),
    GOOD.replace("86400", "31557601"),
    GOOD.replace("86400", "-5"),
    GOOD.replace("86400", "1e5"),
    GOOD.replace("86400", "٣"),                       # a Unicode digit is not a number here
    "version: STSv1\nmode: enforce\nmax_age: 86400\n",  # no mx
    GOOD + "mode: testing\n",                           # mode twice
    GOOD.replace("mx1.example.com", "mx1.*.example.com"),
    GOOD.replace("mx1.example.com", "*"),
    GOOD.replace("mx1.example.com", "com"),
    GOOD.replace("mx1.example.com", "mx 1.example.com"),
    b"version: STSv1\nmode: enforce\nmx: \xff\nmax_age: 1\n",
])
def test_bad_policy(text):
    with pytest.raises(STSError):
        parse_policy(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=400),
                 st.lists(st.sampled_from(["version: STSv1", "mode: enforce", "mode: testing", "max_age: 86400",
                                           "mx: a.example", "mx: *.example", "mx:", ": x", "x", "\r", "\x00",
                                           "max_age: 99999999999", "mode: none"]), max_size=8)
                 .map("\n".join)))
def test_policy_parser_on_hostile_input_raises_only_sts_error(text):
    try:
        p = parse_policy(text)
    except STSError:
        return
    assert p.mode in ("enforce", "testing", "none") and 0 < p.max_age <= 31557600
    assert p.mode == "none" or p.mx


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=4))
def test_txt_parser_on_hostile_input_raises_only_sts_error(records):
    try:
        pid = parse_txt(records)
    except STSError:
        return
    assert pid is None or (pid.isalnum() and len(pid) <= 32)


# ------------------------------------------------------------------ MX matching (RFC 8461 4.1)

@pytest.mark.parametrize("pattern, host, ok", [
    ("mx1.example.com", "mx1.example.com", True),
    ("mx1.example.com", "MX1.EXAMPLE.COM.", True),
    ("mx1.example.com.", "mx1.example.com", True),
    ("mx1.example.com", "mx2.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "a.example.com.evil", False),
    ("*.example.com", "aexample.com", False),
    ("", "a.example.com", False),
])
def test_mx_matching(pattern, host, ok):
    assert mx_matches(pattern, host) is ok


# ------------------------------------------------------------------ the decision

class FakeState:
    """The TLSState contract in memory (the store's own tests run it against SQLite)."""

    def __init__(self, security=None):
        self.security = dict(security or {})
        self.writes = []

    async def get_security(self, domain):
        return self.security.get(domain)

    async def note_security(self, domain, seen, now):
        self.writes.append(("note", domain, seen))
        self.security[domain] = (seen, now)

    async def reset_security(self, domain, seen, now):
        self.writes.append(("reset", domain, seen))
        self.security[domain] = (seen, now)

    async def get_sts(self, domain):
        return None


def _policy(delivery=None, state=None, now=1_000_000.0):
    cfg = config.from_dict({"delivery": {"mta_sts": False, **(delivery or {})}})
    return TLSPolicy(cfg, make_resolver(cfg.dns), state, clock=lambda: now)


def decide(policy, domain):
    return asyncio.run(policy.decide(domain))


def test_levels_and_precedence():
    p = _policy({"require_tls_domains": ["bank.example"],
                 "tls_policy": {"Legacy.Example": "encrypt", "bank2.example": "none", "bank.example": "may"}})
    assert decide(p, "other.example") == Decision("other.example", Level.MAY, "default")
    assert decide(p, "legacy.example").level is Level.ENCRYPT                # keys normalised
    assert decide(p, "bank2.example").level is Level.NONE
    # The per-domain override is the operator's last word, over require_tls_domains.
    assert decide(p, "bank.example") == Decision("bank.example", Level.MAY, "config")
    everything = _policy({"require_tls": True})
    assert decide(everything, "x.example") == Decision("x.example", Level.VERIFY, "require_tls")


def test_config_refuses_unknown_and_dane_levels():
    with pytest.raises(config.ConfigError, match="must be one of none, may, encrypt, verify, dane-only"):
        config.from_dict({"delivery": {"tls_policy": {"a.example": "secure"}}})
    with pytest.raises(config.ConfigError, match="DANE applies by itself"):
        config.from_dict({"delivery": {"tls_policy": {"a.example": "dane"}}})
    with pytest.raises(config.ConfigError, match="delivery.tls_policy.not a domain"):
        config.from_dict({"delivery": {"tls_policy": {"not a domain": "may"}}})
    cfg = config.from_dict({"delivery": {"tls_policy": {"a.example": "verify"}}})
    assert 'tls_policy]\n"a.example" = "verify"' in config.to_toml(config.masked(cfg))


def test_downgrade_memory_raises_the_level_unless_the_operator_says_otherwise():
    now = 1_000_000.0
    state = FakeState({"v.example": ("verified", now - 10), "t.example": ("tls", now - 10),
                       "old.example": ("verified", now - 91 * 86400), "cfg.example": ("verified", now)})
    p = _policy({"tls_policy": {"cfg.example": "may"}}, state, now)
    assert decide(p, "v.example") == Decision("v.example", Level.VERIFY, "downgrade", None, "verified")
    assert decide(p, "t.example") == Decision("t.example", Level.ENCRYPT, "downgrade", None, "tls")
    assert decide(p, "old.example").level is Level.MAY            # lapsed after downgrade_memory
    assert decide(p, "cfg.example") == Decision("cfg.example", Level.MAY, "config")
    assert decide(p, "new.example").level is Level.MAY
    off = _policy({"downgrade_protection": False}, state, now)
    assert decide(off, "v.example").level is Level.MAY


def test_observe_only_raises_and_refreshes_hourly():
    now = [1_000_000.0]
    state = FakeState()
    cfg = config.from_dict({"delivery": {"mta_sts": False}})
    p = TLSPolicy(cfg, make_resolver(cfg.dns), state, clock=lambda: now[0])
    d = Decision("a.example", Level.MAY, "default")

    async def run():
        await p.observe(d, "plain")
        await p.observe(d, "tls")
        await p.observe(d, "verified")
        await p.observe(d, "tls")          # lower: never lowers the memory
        await p.observe(d, "verified")     # same, within the hour: no write
        now[0] += 3601
        await p.observe(d, "verified")     # same, an hour later: seen_at refreshed
    asyncio.run(run())
    assert state.writes == [("note", "a.example", "tls"), ("note", "a.example", "verified"),
                            ("note", "a.example", "verified")]
    assert decide(p, "a.example").level is Level.VERIFY


def test_steps_per_level():
    d = lambda level, src="default": Decision("a.example", level, src)  # noqa: E731
    assert d(Level.NONE).steps(False) == (("none", False),)
    assert d(Level.MAY).steps(False) == (("opportunistic", True), ("opportunistic", False), ("none", False))
    assert d(Level.MAY).steps(True) == (("opportunistic", False), ("none", False))
    assert d(Level.ENCRYPT).steps(False) == (("required", True), ("required", False))
    assert d(Level.VERIFY).steps(True) == (("required", True),)   # never without verification


def test_sts_decision_and_mx_filter():
    pol = Policy("i", "enforce", ("mx1.example.com", "*.b.example.com"), 86400, 0.0)
    enforce = Decision("example.com", Level.VERIFY, "mta-sts", pol)
    assert enforce.label == "sts-enforce" and enforce.enforce_mx and not enforce.report
    assert enforce.mx_allowed("x.b.example.com") and not enforce.mx_allowed("evil.example.net")
    testing = Decision("example.com", Level.MAY, "mta-sts", Policy("i", "testing", pol.mx, 86400, 0.0))
    assert testing.label == "sts-testing" and testing.report and testing.mx_allowed("evil.example.net")
    # The downgrade memory can raise a testing domain's level; the label then says why.
    raised = Decision("example.com", Level.VERIFY, "downgrade", testing.sts, "verified")
    assert raised.label == "verify" and not raised.enforce_mx


def test_tls_failure_classification():
    def verr(code):
        e = ssl.SSLCertVerificationError("x")
        e.verify_code = code
        return e
    assert tls_result_of(verr(62)) == "certificate-host-mismatch"
    assert tls_result_of(verr(10)) == "certificate-expired"
    assert tls_result_of(verr(20)) == "certificate-not-trusted"
    assert tls_result_of(verr(7)) == "validation-failure"
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = verr(19)
    assert tls_result_of(wrapped) == "certificate-not-trusted"
    assert tls_result_of(ssl.SSLError("handshake")) == "validation-failure"


# ------------------------------------------------------------------ the store behind it (both backends)

async def test_tls_state_store(store_backend):
    st_ = await store_backend.tls_state()
    assert await st_.get_sts("a.example") is None
    p = Policy("id1", "enforce", ("mx.a.example", "*.b.a.example"), 600, 100.0)
    await st_.put_sts("a.example", p, 100.0)
    assert await st_.get_sts("a.example") == {"id": "id1", "mode": "enforce",
                                              "mx": ["mx.a.example", "*.b.a.example"],
                                              "max_age": 600, "fetched_at": 100.0}
    await st_.put_sts("a.example", Policy("id2", "testing", ("mx.a.example",), 60, 200.0), 200.0)
    await st_.sts_checked("a.example", 250.0)
    (row,) = await st_.list_sts()
    assert (row["policy_id"], row["mode"], row["expires_at"], row["txt_checked_at"]) == ("id2", "testing", 260.0, 250.0)
    # The downgrade memory only rises (and is refreshed when equal) unless reset.
    assert await st_.get_security("a.example") is None
    await st_.note_security("a.example", "tls", 1.0)
    await st_.note_security("a.example", "verified", 2.0)
    await st_.note_security("a.example", "tls", 3.0)
    assert await st_.get_security("a.example") == ("verified", 2.0)
    await st_.note_security("a.example", "verified", 4.0)
    assert await st_.get_security("a.example") == ("verified", 4.0)
    await st_.reset_security("a.example", "tls", 5.0)
    assert await st_.get_security("a.example") == ("tls", 5.0)
    row = ("2025-12-02", "a.example", "sts", "[]", "mx.a.example", "", 2)
    await st_.add_tlsrpt([row])
    await st_.add_tlsrpt([row, row[:5] + ("certificate-expired", 1)])
    got = await st_.tlsrpt_rows("2025-12-02")
    assert [(r["result"], r["count"]) for r in got] == [("", 4), ("certificate-expired", 1)]
    # A week on, a report marked sent drops the old counts (one node's sweep, every node's rows).
    await st_.mark_tlsrpt_sent("2025-12-02", "a.example", 1_764_633_600.0 + 8 * 86400)
    assert await st_.tlsrpt_rows("2025-12-02") == []
    assert await st_.tlsrpt_sent("2025-12-02") == []


def test_requiretls_mail_parameter():
    from relay import policy as mail_policy, replies

    assert mail_policy.parse_mail_params("REQUIRETLS", size_limit=10, requiretls=True).requiretls is True
    assert mail_policy.parse_mail_params("", size_limit=10, requiretls=True).requiretls is False
    refused = mail_policy.parse_mail_params("REQUIRETLS", size_limit=10, requiretls=False)
    assert refused.code == replies.UNKNOWN_PARAM.code  # not offered before STARTTLS (RFC 8689 4.1)
    assert mail_policy.parse_mail_params("REQUIRETLS=1", size_limit=10, requiretls=True).code == 501


# ------------------------------------------------------------------ TLSRPT counts and report (RFC 8460)

def test_tlsrpt_counts_and_report():
    import gzip
    import json as _json

    from relay.delivery.tlsrpt import CountRow, build_report, gzip_report, policy_lines

    now = 1_764_633_600.0  # 2025-12-02T00:00:00Z
    state = FakeState()
    added = []

    async def add_tlsrpt(rows):
        added.extend(rows)
    state.add_tlsrpt = add_tlsrpt
    p = _policy({}, state, now)
    enforce = Decision("a.example", Level.VERIFY, "mta-sts", Policy("1", "enforce", ("mx.a.example",), 86400, 0.0))
    plain = Decision("b.example", Level.MAY, "default")

    async def run():
        p.count(enforce, "mx.a.example")
        p.count(enforce, "mx.a.example")
        p.count(enforce, "rogue.example", "mx-mismatch")
        p.count(plain, "mx.b.example")
        p.count(Decision("smarthost", Level.VERIFY, "smarthost"), "smtp.example")  # not a recipient policy
        await p.flush()
    asyncio.run(run())
    rows = [CountRow(*r) for r in added]
    assert sum(r.count for r in rows) == 4 and {r.day for r in rows} == {"2025-12-02"}
    report = build_report(rows, day="2025-12-02", organization="relay.test", contact="postmaster@relay.test",
                          report_id="r1")
    assert report["date-range"] == {"start-datetime": "2025-12-02T00:00:00Z", "end-datetime": "2025-12-02T23:59:59Z"}
    a, b = report["policies"]
    assert a["policy"] == {"policy-type": "sts", "policy-domain": "a.example",
                           "policy-string": policy_lines("enforce", ["mx.a.example"], 86400), "mx-host": ["mx.a.example"]}
    assert a["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 1}
    assert a["failure-details"] == [{"result-type": "validation-failure", "receiving-mx-hostname": "rogue.example",
                                     "failed-session-count": 1}]
    assert b["policy"] == {"policy-type": "no-policy-found", "policy-domain": "b.example"}
    assert "failure-details" not in b
    assert _json.loads(gzip.decompress(gzip_report(report))) == report
