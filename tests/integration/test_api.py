"""The HTTP API on a real aiohttp server (127.0.0.1, port 0) over real SQLite stores: every
endpoint, every answer validated against the served OpenAPI document (schemathesis'
response validation), and hostile input: huge bodies, wrong content types, non-UTF-8, bad
tokens, unknown domains, injection-looking logins. Clear JSON errors, never a 500."""
from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3

import pytest
import requests
import schemathesis

from relay.api import SPEC, AuthFailures
from relay.config import Config, CredentialsConfig, DNSConfig, DomainsConfig, StorageConfig
from relay.store.contract import NewMessage, NewRecipient
from tests.support.api_server import ApiServer

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
D = "mg.example.com"
SCHEMA = schemathesis.openapi.from_dict(SPEC)


def make_cfg(tmp_path, **over) -> Config:
    return dataclasses.replace(Config(), storage=StorageConfig(path=str(tmp_path / "relay.db")),
                               credentials=CredentialsConfig(**FAST), domains=DomainsConfig(dkim_algorithm="ed25519"),
                               **over)


class Client:
    """requests against the server; each answer checked against the spec for its operation."""

    def __init__(self, api: ApiServer, token: str | None):
        self.api, self.token = api, token
        self.session = requests.Session()

    def __call__(self, method: str, template: str, path: str | None = None, *, token: str | None = "default",
                 validate: bool = True, **kw) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        tok = self.token if token == "default" else token
        if tok is not None:
            headers.setdefault("Authorization", f"Bearer {tok}")
        r = self.session.request(method, self.api.url + (path or template), headers=headers, timeout=10, **kw)
        assert r.status_code != 500, r.text
        assert r.headers["Content-Type"].startswith("application/json"), r.headers
        if validate:
            SCHEMA[template][method].validate_response(r)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"code", "message"} and err["message"]
        return r


@pytest.fixture
def api(tmp_path):
    with ApiServer(make_cfg(tmp_path)) as server:
        yield server


@pytest.fixture
def w(api):
    return Client(api, api.add_key("write"))


def err(r: requests.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]["message"]


def test_openapi_document_is_served_and_is_3_1(w):
    r = w("GET", "/openapi.json", token=None)
    assert r.status_code == 200 and r.json()["openapi"] == "3.1.0"
    assert r.json() == json.loads(json.dumps(SPEC))


def test_domains_end_to_end(w):
    assert w("GET", "/domains").json() == {"items": []}
    r = w("POST", "/domains", json={"name": "MG.Example.com"})
    assert r.status_code == 201 and r.json()["name"] == D and r.json()["dkim_selector"]
    err(w("POST", "/domains", json={"name": D}), 409, "conflict")
    assert [d["name"] for d in w("GET", "/domains").json()["items"]] == [D]
    g = w("GET", "/domains/{domain}", f"/domains/{D}").json()
    assert (g["credentials"], g["credential_cap"], g["state"]) == (0, 5, "unverified")
    recs = w("GET", "/domains/{domain}/records", f"/domains/{D}/records").json()["items"]
    assert {r["purpose"] for r in recs} >= {"DKIM (active)", "SPF"}
    err(w("GET", "/domains/{domain}", "/domains/nope.example"), 404, "not_found")
    err(w("GET", "/domains/{domain}", "/domains/not_a_domain"), 422, "invalid")
    w("POST", "/domains", json={"name": "other.example", "dkim": False})
    r = w("DELETE", "/domains/{domain}", "/domains/other.example")
    assert r.json() == {"removed": "other.example", "removed_credentials": 0}
    err(w("DELETE", "/domains/{domain}", "/domains/other.example"), 404, "not_found")
    err(w("DELETE", "/domains/{domain}", f"/domains/{D}?force=maybe"), 422, "invalid")
    w("POST", "/domains/{domain}/credentials", f"/domains/{D}/credentials", json={"login": "app"})
    assert "?force=true" in err(w("DELETE", "/domains/{domain}", f"/domains/{D}"), 409, "conflict")
    assert w("DELETE", "/domains/{domain}", f"/domains/{D}?force=true").json() == \
        {"removed": D, "removed_credentials": 1}


def test_verify_against_the_configured_resolver(tmp_path):
    from tests.support.dns_server import DNSServer
    with DNSServer({}) as dns, ApiServer(make_cfg(tmp_path, dns=DNSConfig(nameservers=(dns.address,),
                                                                          timeout=3))) as api:
        w = Client(api, api.add_key("write"))
        w("POST", "/domains", json={"name": D})
        r = w("POST", "/domains/{domain}/verify", f"/domains/{D}/verify").json()
        assert r["verified"] is False and {c["status"] for c in r["records"]} == {"missing", "optional"}
        for rec in w("GET", "/domains/{domain}/records", f"/domains/{D}/records").json()["items"]:
            if rec["type"] == "TXT":
                dns.set(rec["name"], "TXT", [rec["value"]])
        r = w("POST", "/domains/{domain}/verify", f"/domains/{D}/verify").json()
        assert r["verified"] is True and all(c["status"] == "ok" for c in r["records"])
        assert w("GET", "/domains/{domain}", f"/domains/{D}").json()["state"] == "verified"


def test_credentials_flow_and_the_cap(w, api):
    w("POST", "/domains", json={"name": D, "dkim": False})
    r = w("POST", "/domains/{domain}/credentials", f"/domains/{D}/credentials", json={"login": "app"})
    assert r.status_code == 201 and r.headers["Cache-Control"] == "no-store"
    body = r.json()
    assert body["credential"]["username"] == f"app@{D}" and len(body["password"]) >= 20
    r = w("POST", "/domains/{domain}/credentials", f"/domains/{D}/credentials",
          json={"login": f"b@{D}", "password": "correct horse battery staple"})
    assert r.json()["password"] == "correct horse battery staple"
    err(w("POST", "/domains/{domain}/credentials", f"/domains/{D}/credentials", json={"login": "app"}),
        409, "conflict")
    for i in range(3):
        w("POST", "/domains/{domain}/credentials", f"/domains/{D}/credentials", json={"login": f"u{i}"})
    msg = err(w("POST", "/domains/{domain}/credentials", f"/domains/{D}/credentials", json={"login": "sixth"}),
              409, "credential_limit")
    assert "limit 5" in msg
    items = w("GET", "/domains/{domain}/credentials", f"/domains/{D}/credentials").json()["items"]
    assert len(items) == 5 and items[0]["last_login"] is None
    r = w("PUT", "/domains/{domain}/credentials/{login}", f"/domains/{D}/credentials/app")
    assert r.headers["Cache-Control"] == "no-store" and r.json()["login"] == f"app@{D}"
    assert r.json()["password"] != body["password"]
    r = w("PUT", "/domains/{domain}/credentials/{login}", f"/domains/{D}/credentials/app@{D}",
          json={"password": "another good passphrase"})
    assert r.json()["password"] == "another good passphrase"
    err(w("PUT", "/domains/{domain}/credentials/{login}", f"/domains/{D}/credentials/app", json={"password": "short"}),
        422, "invalid")
    err(w("PUT", "/domains/{domain}/credentials/{login}", f"/domains/{D}/credentials/app@other.example",
          json={}), 422, "invalid")
    assert w("DELETE", "/domains/{domain}/credentials/{login}", f"/domains/{D}/credentials/app").json() == \
        {"deleted": f"app@{D}"}
    err(w("DELETE", "/domains/{domain}/credentials/{login}", f"/domains/{D}/credentials/app"), 404, "not_found")
    err(w("GET", "/domains/{domain}/credentials", "/domains/nope.example/credentials"), 404, "not_found")
    err(w("POST", "/domains/{domain}/credentials", "/domains/nope.example/credentials", json={"login": "x"}),
        404, "not_found")
    # Every write was audited with the key's id, via api, from 127.0.0.1.
    conn = sqlite3.connect(api.cfg.storage.path)
    rows = conn.execute("SELECT actor, via, ip, action FROM audit_log WHERE via = 'api' ORDER BY id").fetchall()
    conn.close()
    key_id = w.token.split("_")[1]
    assert {(a, v, ip) for a, v, ip, _ in rows} == {(key_id, "api", "127.0.0.1")}
    assert [r[3] for r in rows] == ["domain.add"] + ["credential.create"] * 5 + ["credential.reset"] * 2 + \
        ["credential.delete"]


def _enqueue(api: ApiServer, n: int, sender: str = f"app@{D}") -> list[str]:
    async def go():
        return [await api.ops.queue._queue.enqueue(NewMessage(
            sender, (NewRecipient("bob@example.net", "example.net"),), b"Subject: hi\r\nX-A: <b>\r\n\r\nbody\r\n",
            auth_user=sender)) for _ in range(n)]
    return api.run(go())


def test_queue_endpoints(w, api):
    ids = _enqueue(api, 7)
    page = w("GET", "/queue", "/queue?limit=3").json()
    assert [m["id"] for m in page["items"]] == ids[:3] and page["next"]
    seen = [m["id"] for m in page["items"]]
    for _ in range(5):  # bounded
        if not page["next"]:
            break
        page = w("GET", "/queue", f"/queue?limit=3&after={page['next']}").json()
        seen += [m["id"] for m in page["items"]]
    assert seen == ids
    assert [m["id"] for m in w("GET", "/queue", f"/queue?qid={ids[2]}").json()["items"]] == [ids[2]]
    assert w("GET", "/queue", "/queue?domain=nobody.example").json() == {"items": [], "next": None}
    assert len(w("GET", "/queue", "/queue?state=pending&recipient=bob@").json()["items"]) == 7
    err(w("GET", "/queue", "/queue?state=bogus", validate=False), 422, "invalid")
    err(w("GET", "/queue", "/queue?limit=abc", validate=False), 422, "invalid")
    err(w("GET", "/queue", "/queue?after=%%%"), 422, "invalid")
    # Forged cursors: deep nesting (json.loads raises RecursionError), NaN, a dict: refused, never a 500.
    import base64
    for raw in (b"[" * 3000 + b"]" * 3000, b'[NaN,"x"]', b'{"a":1,"b":2}', b'[1e999,"x"]'):
        forged = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        err(w("GET", "/queue", f"/queue?after={forged}"), 422, "invalid")
    err(w("GET", "/queue", "/queue?colour=red"), 422, "unknown_field")
    err(w("GET", "/queue", "/queue?state=active&state=all"), 422, "invalid")
    m = w("GET", "/queue/{qid}", f"/queue/{ids[0]}").json()
    assert m["headers"] == "Subject: hi\r\nX-A: <b>" and m["recipients"][0]["state"] == "pending"
    err(w("GET", "/queue/{qid}", "/queue/NOSUCH"), 404, "not_found")
    assert w("POST", "/queue/{qid}/retry", f"/queue/{ids[0]}/retry").json() == {"id": ids[0], "due_now": 1}
    err(w("POST", "/queue/{qid}/retry", "/queue/NOSUCH/retry"), 404, "not_found")
    assert w("DELETE", "/queue/{qid}", f"/queue/{ids[0]}").json() == {"deleted": ids[0], "bounced": False}
    assert w("DELETE", "/queue/{qid}", f"/queue/{ids[1]}?bounce=true").json() == {"deleted": ids[1], "bounced": True}
    items = w("GET", "/queue", "/queue?limit=500").json()["items"]
    assert [m["sender"] for m in items].count("") == 1  # the failure report, from the null sender
    assert w("GET", "/queue/{qid}", f"/queue/{ids[1]}").json()["state"] == "deleted"
    err(w("DELETE", "/queue/{qid}", "/queue/NOSUCH"), 404, "not_found")


def test_tokens_scopes_and_the_failure_limit(tmp_path, caplog):
    clock = [1000.0]
    failures = AuthFailures(limit=3, window=60, clock=lambda: clock[0])
    with ApiServer(make_cfg(tmp_path), auth_failures=failures) as api:
        read = Client(api, api.add_key("read"))
        write_token = api.add_key("write")
        assert read("GET", "/domains").status_code == 200
        err(read("POST", "/domains", json={"name": D}), 403, "forbidden")
        err(read("DELETE", "/queue/{qid}", "/queue/X"), 403, "forbidden")
        caplog.set_level(logging.WARNING, logger="relay.api")
        for bad in (None, "garbage"):
            r = read("GET", "/domains", token=bad)
            err(r, 401, "unauthorized")
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        lines = [r for r in caplog.records if r.getMessage() == "api_auth_failed"]
        assert [getattr(r, "relay_fields")["ip"] for r in lines] == ["127.0.0.1", "127.0.0.1"]
        r = read("GET", "/domains", headers={"Authorization": "Basic dXNlcjpwYXNz"}, token=None)
        err(r, 401, "unauthorized")
        # Three failures in the window: the next request is refused before its token is looked at,
        # even a good one, until the window has passed.
        err(read("GET", "/domains", token=write_token), 429, "rate_limited")
        assert int(read("GET", "/domains", validate=False).headers["Retry-After"]) >= 1
        clock[0] += 61
        assert read("GET", "/domains", token=write_token).status_code == 200
        # Revoked: 401, and says so.
        key_id = read.token.split("_")[1]
        from relay.operations import Actor
        api.run(api.ops.revoke_api_key(Actor("tests", "cli"), key_id))
        assert "revoked" in err(read("GET", "/domains"), 401, "unauthorized")


def test_hostile_bodies_and_paths(tmp_path):
    with ApiServer(make_cfg(tmp_path), max_body=4096) as api:
        w = Client(api, api.add_key("write"))
        w("POST", "/domains", json={"name": D})
        url = f"/domains/{D}/credentials"
        t = "/domains/{domain}/credentials"
        huge = b'{"login": "' + b"a" * 100_000 + b'"}'
        err(w("POST", t, url, data=huge, headers={"Content-Type": "application/json"}), 413, "too_large")

        def chunks():
            for _ in range(100):
                yield b"x" * 1000
        err(w("POST", t, url, data=chunks(), headers={"Content-Type": "application/json"}), 413, "too_large")
        err(w("POST", t, url, data=b"login=app", headers={"Content-Type": "application/x-www-form-urlencoded"}),
            415, "unsupported_media_type")
        err(w("POST", t, url, data='{"login": "app"}', headers={"Content-Type": "text/plain"}),
            415, "unsupported_media_type")
        err(w("POST", t, url, data=b'{"login": "\xff\xfe"}', headers={"Content-Type": "application/json"}),
            400, "malformed_json")
        err(w("POST", t, url, data=b'{"login": ', headers={"Content-Type": "application/json"}), 400,
            "malformed_json")
        err(w("POST", t, url, data=b"[" * 2000 + b"]" * 2000, headers={"Content-Type": "application/json"}),
            400, "malformed_json")
        err(w("POST", t, url, json=["login"]), 422, "invalid")
        err(w("POST", t, url, json={"login": "app", "admin": True}), 422, "unknown_field")
        err(w("POST", t, url, json={"login": 5}), 422, "invalid")
        err(w("POST", t, url, json={"login": "app", "password": None}), 422, "invalid")
        err(w("POST", t, url, json={}), 422, "invalid")
        err(w("POST", "/domains", json={"name": True}), 422, "invalid")
        accepted = set()
        for login in ("' OR 1=1 --", "a@b@c", "x\u0000y", "<script>", "app%40" + D, "..%2F..%2Fetc", "x'--"):
            r = w("POST", t, url, json={"login": login})
            # Refused, or stored as the literal text it is (parameters, never SQL; escaped on pages).
            assert r.status_code in (201, 422), (login, r.status_code, r.text)
            if r.status_code == 201:
                assert r.json()["credential"]["username"] == f"{login.lower()}@{D}"
                accepted.add(f"{login.lower()}@{D}")
        assert {"' or 1=1 --@" + D, f"x\u0000y@{D}"}.isdisjoint(accepted)
        for path in (f"/domains/{D}/credentials/' OR '1'='1", f"/domains/%FF%FE/credentials/x",
                     "/domains/" + "a" * 5000 + ".example/credentials/x"):
            r = w("DELETE", "/domains/{domain}/credentials/{login}", path, validate=False)
            assert r.status_code in (404, 414, 422, 431, 400), (path, r.status_code)
            assert "Traceback" not in r.text
        conn = sqlite3.connect(api.cfg.storage.path)
        assert {r[0] for r in conn.execute("SELECT username FROM credentials")} == accepted
        conn.close()
        for path in ("/queue?sender=%FF%FE", "/queue?qid=%00", "/queue?recipient=%25%5F", "/queue?limit=-1",
                     "/queue?limit=99999999999999999999", "/queue?after=" + "A" * 3000):
            r = w("GET", "/queue", path, validate=False)
            assert r.status_code in (200, 422), (path, r.status_code, r.text)
        for path in ("/queue/%FF", "/queue/%00", "/queue/..%2F..", "/queue/' OR 1=1 --"):
            err(w("GET", "/queue/{qid}", path), 404, "not_found")
        # Unknown endpoints and methods: JSON too.
        err(w("GET", "/nope", validate=False), 404, "not_found")
        err(w("PATCH", "/domains", validate=False), 405, "method_not_allowed")


def test_the_failure_limit_takes_an_ipv6_64_as_one_address():
    # Like the admin login's limit and the SMTP side's limits.auth_ipv6_prefix default: one host
    # holds a whole /64 and must not get 2^64 budgets (nor evict everyone else's by rotating).
    clock = [1000.0]
    failures = AuthFailures(limit=3, window=60, clock=lambda: clock[0])
    for i in range(3):
        failures.fail(f"2001:db8:1:2::{i + 1:x}")
    assert failures.blocked_for("2001:db8:1:2:ffff::9") > 0
    assert failures.blocked_for("2001:db8:1:3::1") == 0
    assert failures.blocked_for("192.0.2.1") == 0
    for _ in range(3):
        failures.fail("192.0.2.1")
    assert failures.blocked_for("192.0.2.1") > 0 and failures.blocked_for("192.0.2.2") == 0


def test_the_failure_limit_takes_an_ipv4_mapped_address_as_that_ipv4_address():
    failures = AuthFailures(limit=3, window=60, clock=lambda: 1000.0)
    for _ in range(3):
        failures.fail("::ffff:203.0.113.9")
    assert failures.blocked_for("203.0.113.9") > 0
    assert failures.blocked_for("::ffff:198.51.100.7") == 0
