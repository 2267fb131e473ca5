"""A sysadmin's first hour (issue 13), through the installed console script run from other directories.

No silent empty database (one way to find the config, said out loud), no certificate written
into a mistyped directory, honest DNS advice on the default hostname, outcomes you can see for
mail that cannot be delivered, LAST LOGIN on every login, hints that print the command run.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from relay import cli
from tests.conftest import PASSWORD, USER
from tests.integration.test_cli import error_line, ok, run_on_tty
from tests.support import tools
from tests.support.relay_instance import RelayInstance, relay_executable, to_toml, wait_until

EXE = relay_executable()[0]
SYSTEM_CONFIG = Path("/etc/relay/relay.toml")


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, exe: str = EXE,
        input: str | None = None) -> subprocess.CompletedProcess:
    """`relay ARGV` from `cwd`, with no RELAY_CONFIG unless `env` gives one."""
    environ = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run([exe, *argv], cwd=cwd, env={**environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60, input=input)


def local_config(workdir: Path, inst: RelayInstance, **storage) -> Path:
    """workdir/config/relay.toml: the instance's config, with a storage path relative to workdir."""
    cfg = json.loads(json.dumps(inst.config))
    cfg["storage"] = {"path": "var/relay.db", **storage}
    (workdir / "config").mkdir(parents=True)
    path = workdir / "config" / "relay.toml"
    path.write_text(to_toml(cfg))
    return path


# ------------------------------------------------------------------ 1. config discovery

READ_AND_WRITE = [["user", "list"], ["queue", "list"], ["queue", "history"], ["domain", "list"], ["status"],
                  ["check-config"], ["domain", "add", "mg.example.com"], ["serve"]]


@pytest.mark.skipif(SYSTEM_CONFIG.exists(), reason=f"{SYSTEM_CONFIG} exists on this machine: it would be found")
@pytest.mark.parametrize("argv", READ_AND_WRITE, ids=" ".join)
def test_no_config_anywhere_refuses_in_one_line_and_creates_nothing(tmp_path, argv):
    line = error_line(run(argv, tmp_path), 2, "no config file", "-c (not given)", "$RELAY_CONFIG (unset)",
                      f"./config/relay.toml (in {tmp_path})", str(SYSTEM_CONFIG))
    assert "-c PATH" in line
    assert list(tmp_path.iterdir()) == []  # no var/relay.db, no certs/


def test_config_in_the_working_directory_is_found_and_said(tmp_path):
    inst = RelayInstance(tmp_path / "inst")
    work = tmp_path / "work"
    config = local_config(work, inst)
    db_path = work / "var" / "relay.db"
    status = run(["status"], work)
    out = ok(status)
    assert f"config:    {config} (found by ./config/relay.toml)" in out
    assert f"database:  {db_path} (does not exist yet" in out
    data = json.loads(ok(run(["status", "--json"], work)))
    assert (data["config"], data["found_by"], data["database"], data["database_exists"]) == \
        (str(config), "./config/relay.toml", str(db_path), False)

    # Read-only and change commands other than `domain add` never create the database.
    for argv in (["user", "list"], ["queue", "list"], ["domain", "list"], ["user", "delete", USER],
                 ["queue", "retry", "--all"]):
        error_line(run(argv, work), 1, f"database {db_path} does not exist",
                   "storage.path in config/relay.toml", f"relative to the current directory {work}")
    assert not (work / "var").exists()

    ok(run(["domain", "add", "mg.example.com"], work))
    assert db_path.exists()
    cp = run(["-v", "user", "list"], work)
    assert cp.returncode == 0 and cp.stdout.strip() == "no credentials"
    assert cp.stderr == f"relay: config {config} (found by ./config/relay.toml); database {db_path}\n"
    assert "1 domain(s), 0 credential(s), 0 queued message(s)" in ok(run(["status"], work))

    # From another directory through RELAY_CONFIG, the relative storage path points elsewhere:
    # refused, with the directory it was resolved against, rather than a new empty database.
    other = tmp_path / "cron"
    other.mkdir()
    error_line(run(["user", "list"], other, env={"RELAY_CONFIG": str(config)}), 1,
               f"database {other / 'var' / 'relay.db'} does not exist", f"current directory {other}")
    assert list(other.iterdir()) == []


def test_serve_logs_its_config_and_database(tmp_path):
    with RelayInstance(tmp_path / "relay") as inst:
        [e] = inst.events_named("starting")
    assert (e["config"], e["found_by"], e["database"]) == \
        (str(inst.config_path), "-c", inst.config["storage"]["path"])


# ------------------------------------------------------------------ 2. certificates only where meant

def test_mistyped_certificate_directory_is_an_error_not_a_self_signed_pair(tmp_path):
    typo = tmp_path / "letsencrypt" / "live" / "mail.example.com"  # does not exist
    inst = RelayInstance(tmp_path / "relay", config={"tls": {"cert": str(typo / "fullchain.pem"),
                                                             "key": str(typo / "privkey.pem")}})
    expected = f"config error: tls.cert: file {typo / 'fullchain.pem'} not found and its directory {typo} does not exist"
    for argv in (["check-config"], ["serve"]):
        error_line(run(["-c", str(inst.config_path), *argv], tmp_path), 2, expected)
    error_line(run(["-c", str(inst.config_path), "cert", "selfsigned"], tmp_path), 2, "tls.cert", str(typo))
    assert not (tmp_path / "letsencrypt").exists()


# ------------------------------------------------------------------ 3. honest DNS advice

def test_default_hostname_gets_warnings_and_an_spf_record_to_fill_in(tmp_path):
    inst = RelayInstance(tmp_path / "relay", config={"server": {"hostname": "localhost"}})
    cp = inst.cli("check-config")
    assert cp.returncode == 0
    warnings = cp.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("relay: warning: ") for w in warnings)
    assert "server.hostname is 'localhost'" in warnings[0]
    assert "SPF record would rely on server.hostname ('a:localhost')" in warnings[1]
    assert "domains.public_addresses" in warnings[1]

    ok(inst.cli("domain", "add", "mg.example.com"))
    cp = inst.cli("domain", "dns", "mg.example.com", "--json")
    assert cp.stderr.splitlines() == warnings  # said again where the record is printed
    [spf] = [r for r in json.loads(cp.stdout) if r["purpose"] == "SPF"]
    assert spf["value"] == "v=spf1 ip4:<PUBLIC-IPv4-OF-THIS-RELAY> ~all"
    assert "a:localhost" not in inst.cli("domain", "dns", "mg.example.com", "--zone").stdout

    with inst:
        logged = inst.events_named("config_warning")
    assert [e["warning"] for e in logged] == [w.removeprefix("relay: warning: ") for w in warnings]
    assert {e["level"] for e in logged} == {"warning"}

    inst.config["domains"] = {"public_addresses": ["192.0.2.10"]}
    inst.config["server"]["hostname"] = "mail.example.com"
    inst.write_config()
    cp = inst.cli("domain", "dns", "mg.example.com", "--json")
    assert cp.returncode == 0 and cp.stderr == ""
    assert [r["value"] for r in json.loads(cp.stdout) if r["purpose"] == "SPF"] == ["v=spf1 ip4:192.0.2.10 ~all"]


# ------------------------------------------------------------------ 4. outcomes you can see

def test_unresolvable_recipient_shows_in_the_queue_history(make_relay, dns_server):
    # No zones at all: the recipient's domain and the sender's (for the bounce) are NXDOMAIN,
    # as on the quick start's machine without DNS. One more domain answers SERVFAIL: deferred.
    dns_server.servfail.add("later.example")
    relay = make_relay(start=False, dns=dns_server.address)
    relay.add_user(USER, PASSWORD)
    relay.start()
    qid = relay.submit(USER, PASSWORD, USER, ["you@nowhere.example"], b"Subject: first test\r\n\r\nhello\r\n")
    later = relay.submit(USER, PASSWORD, USER, ["you@later.example"], b"Subject: later\r\n\r\nhello\r\n")

    def finished() -> list[dict]:
        return json.loads(relay.cli("queue", "history", "--json", check=True).stdout)

    rows = wait_until(lambda: len(finished()) == 2 and finished(), what="the message and its bounce to finish")
    by_id = {r["id"]: r for r in rows}
    assert by_id[qid]["state"] == "bounced" and by_id[qid]["recipients"] == ["you@nowhere.example"]
    [(dsn_id, dsn)] = [(i, r) for i, r in by_id.items() if i != qid]
    assert dsn["sender"] == "" and dsn["state"] == "dropped bounce" and dsn["recipients"] == [USER]

    # `queue list` shows what is waiting and points at the history; --all shows both.
    listed = relay.cli("queue", "list", check=True).stdout
    assert later in listed and qid not in listed and "queue history" in listed
    assert {qid, dsn_id, later} <= {r["id"] for r in json.loads(relay.cli("queue", "list", "--all", "--json").stdout)}
    table = relay.cli("queue", "history", check=True).stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "FINISHED", "SENDER", "RECIPIENTS", "OUTCOME"]

    # `queue show` works for a finished message: outcome, history, headers, the DKIM domain.
    shown = relay.cli("queue", "show", qid, check=True).stdout
    assert "state:     bounced (finished" in shown and "Subject: first test" in shown
    data = json.loads(relay.cli("queue", "show", qid, "--json", check=True).stdout)
    assert [h["event"] for h in data["history"]] == ["queued", "failed", "bounce"]
    assert (data["dkim_domain"], data["dkim_signed"]) == ("mg.example.com", True)
    assert json.loads(relay.cli("queue", "show", dsn_id, "--json", check=True).stdout)["history"][-1]["event"] \
        == "dropped"

    # Deferrals and failures are warnings: a log filtered at warning still shows mail not moving.
    assert relay.wait_event("delivery", qid=later, result="deferred")
    assert {e["level"] for e in relay.events_named("delivery", qid=later)} == {"warning"}
    assert {e["level"] for e in relay.events_named("delivery", qid=qid)} == {"warning"}


def test_finished_messages_are_purged_after_the_retention(make_relay, dns_server):
    relay = make_relay(start=False, dns=dns_server.address, config={"storage": {"finished_retention": 0}})
    relay.add_user(USER, PASSWORD)
    relay.start()
    qid = relay.submit(USER, PASSWORD, USER, ["you@nowhere.example"], b"Subject: gone\r\n\r\nhello\r\n")
    assert relay.wait_event("delivery", qid=qid, result="failed")
    assert relay.wait_event("bounce_dropped")  # its bounce finished too: nothing left to finish later
    relay.restart()  # the daemon sweeps at start (then every 30 s)
    wait_until(lambda: json.loads(relay.cli("queue", "history", "--json", check=True).stdout) == [],
               what="the finished messages to be purged")
    error_line(relay.cli("queue", "show", qid), 1, "not in the queue nor among the messages finished in the last 0s")


# ------------------------------------------------------------------ 5. hints print the command run

def test_hints_print_the_command_actually_run(tmp_path):
    inst = RelayInstance(tmp_path / "relay")
    cfg = str(inst.config_path)
    # By its path, with -c: the hint repeats both.
    out = ok(run(["-c", cfg, "domain", "add", "a.example"], tmp_path))
    assert f"`{EXE} -c {cfg} domain dns a.example`" in out
    assert f"{EXE} -c {cfg} user add app@a.example --generate" in out
    # Relative to the working directory, as typed.
    rel = os.path.relpath(EXE, tmp_path)
    out = ok(run(["-c", cfg, "domain", "add", "b.example"], tmp_path, exe=rel))
    assert f"`{shlex.quote(rel)} -c {cfg} domain dns b.example`" in out
    # Found on PATH, config from the environment: a bare `relay`.
    env = {"PATH": f"{Path(EXE).parent}:{os.environ['PATH']}", "RELAY_CONFIG": cfg}
    out = ok(run(["domain", "add", "c.example"], tmp_path, env=env, exe="relay"))
    assert "`relay domain dns c.example`" in out
    # Hints inside store errors too (placeholders in <>).
    error_line(run(["user", "add", "x@d.example", "--generate"], tmp_path, env=env, exe="relay"), 1,
               "add it first: relay domain add d.example")


# ------------------------------------------------------------------ 6. LAST LOGIN on every login

def test_last_login_follows_every_login_cache_hits_included(relay):
    def last_login() -> float:
        [row] = json.loads(relay.cli("user", "list", "--json", check=True).stdout)
        return row["last_login"] or 0.0

    def login() -> None:
        with relay.smtp() as s:
            s.login(USER, PASSWORD)

    login()  # argon2 verification
    first = wait_until(last_login, what="the first login to be recorded")
    login()  # within verify_cache_ttl: answered from the cache
    wait_until(lambda: last_login() > first, what="the cached login to be recorded")
    assert relay.metrics_text().count('relay_auth_cache_total{result="hit"} 1.0') == 1


# ------------------------------------------------------------------ 8. smaller items

def test_password_prompt_refuses_a_short_first_entry_before_asking_again(tmp_path):
    inst = RelayInstance(tmp_path / "relay")
    ok(inst.cli("domain", "add", "mg.example.com"))
    argv = relay_executable() + ["-c", str(inst.config_path), "user", "add", USER]
    rc, out = run_on_tty(argv, [("Password for", "short\n")])
    assert rc == 1 and "relay: password too short: at least 12 characters" in out
    assert "Repeat password" not in out


@pytest.mark.parametrize("text,cut", [
    (None, "-"),
    ("451 4.2.0 busy", "451 4.2.0 busy"),
    ("550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table",
     "550 5.1.1 <bob@example.net>: Recipient address rejected\u2026"),
    ("x" * 80, "x" * 59 + "\u2026"),
])
def test_queue_list_cuts_last_error_at_a_word_with_an_ellipsis(text, cut):
    assert cli.shorten(text) == cut
    assert len(cli.shorten(text)) <= 60


def test_missing_tool_skips_or_fails_under_the_ci_flag(monkeypatch):
    monkeypatch.delenv(tools.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        tools.missing("frobnicator not installed")
    monkeypatch.setenv(tools.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="RELAY_REQUIRE_TOOLS=1"):
        tools.missing("frobnicator not installed")
