"""The `relay` command through the installed console script, on real SQLite files and a real relay.

Every failing command must answer with exactly one stderr line starting with "relay: ", the
documented exit code (1 not found/refused, 2 usage or config error) and never a traceback.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import smtplib
import ssl
import stat
import subprocess
import termios
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

import relay
from relay import config as config_mod, db
from relay.config import CredentialsConfig
from relay.credentials import CredentialStore
from tests.support.relay_instance import FAST_ARGON2, RelayInstance, relay_executable

PW = "correct horse battery staple"
USER = "app@mg.example.com"


@pytest.fixture
def inst(tmp_path) -> RelayInstance:
    return RelayInstance(tmp_path / "relay")


def ok(cp: subprocess.CompletedProcess) -> str:
    assert cp.returncode == 0, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stderr == "", cp.stderr
    return cp.stdout


def error_line(cp: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert cp.returncode == code, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("relay: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def users(inst: RelayInstance, *domain: str) -> list[str]:
    return [r["username"] for r in json.loads(ok(inst.cli("user", "list", *domain, "--json")))]


def add_user(inst: RelayInstance, username: str, password: str = PW) -> None:
    ok(inst.cli("user", "add", username, "--password-stdin", input=password + "\n"))


def store_verifies(inst: RelayInstance, username: str, password: str) -> bool:
    """Check a password against the database file, as the daemon would."""
    async def run() -> bool:
        conn = await db.open_async(inst.config["storage"]["path"])
        try:
            store = CredentialStore(conn, CredentialsConfig(**FAST_ARGON2))
            return await store.verify(username.encode(), password.encode()) is not None
        finally:
            await conn.close()
    return asyncio.run(run())


def can_login(inst: RelayInstance, username: str, password: str) -> bool:
    """One AUTH PLAIN (smtplib.login would retry a 535 with LOGIN: two failures per call)."""
    s = inst.smtp()
    try:
        s.user, s.password = username, password
        s.auth("PLAIN", s.auth_plain)
        return True
    except smtplib.SMTPAuthenticationError as exc:
        assert exc.smtp_code == 535, exc
        return False
    finally:
        s.close()


# ------------------------------------------------------------------ basics

def test_version():
    cp = subprocess.run(relay_executable() + ["--version"], capture_output=True, text=True, timeout=30)
    assert ok(cp).strip() == f"relay {relay.__version__}"


@pytest.mark.parametrize("argv,needle", [
    ([], "required: COMMAND"),
    (["domain"], "required: ACTION"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["user", "add"], "required: USER@DOMAIN"),
    (["user", "add", USER, "--generate", "--password-stdin"], "not allowed with argument"),
    (["domain", "list", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(inst, argv, needle):
    error_line(inst.cli(*argv), 2, needle)


# ------------------------------------------------------------------ domains

def test_domain_add_list_remove(inst):
    out = ok(inst.cli("domain", "add", "Bücher.example"))
    assert "bücher.example (xn--bcher-kva.example)" in out
    ok(inst.cli("domain", "add", "mg.example.com"))
    table = ok(inst.cli("domain", "list")).splitlines()
    assert table[0].split() == ["DOMAIN", "CREDENTIALS", "STATE", "DKIM", "CREATED"]
    assert table[1].split()[:3] == ["mg.example.com", "0", "unverified"]
    assert table[2].startswith("bücher.example (xn--bcher-kva.example)")  # ordered by the stored ASCII form
    for argv in (["domain", "list", "--json"], ["--json", "domain", "list"]):
        rows = json.loads(ok(inst.cli(*argv)))
        assert [(r["domain"], r["display"], r["credentials"]) for r in rows] == [
            ("mg.example.com", "mg.example.com", 0), ("xn--bcher-kva.example", "bücher.example", 0)]
    added = json.loads(ok(inst.cli("domain", "add", "other.example", "--json")))
    assert added["domain"] == "other.example" and added["display"] == "other.example"
    assert added["dkim_algorithm"] == "rsa" and added["dkim_selector"].startswith("relay")

    error_line(inst.cli("domain", "add", "MG.Example.COM"), 1, "already exists")
    error_line(inst.cli("domain", "add", "localhost"), 1, "not a domain name")

    add_user(inst, USER)
    error_line(inst.cli("domain", "remove", "mg.example.com"), 1, "1 credential(s)", "--force")
    assert USER in users(inst)
    out = ok(inst.cli("domain", "remove", "mg.example.com", "--force"))
    assert "1 credential(s) removed" in out
    assert users(inst) == []
    ok(inst.cli("domain", "remove", "xn--bcher-kva.example"))
    error_line(inst.cli("domain", "remove", "mg.example.com"), 1, "not found")
    assert [r["domain"] for r in json.loads(ok(inst.cli("domain", "list", "--json")))] == ["other.example"]
    ok(inst.cli("domain", "remove", "other.example"))
    assert "no domains" in ok(inst.cli("domain", "list"))


def test_domain_remove_refused_while_mail_is_queued(make_relay, dns_server):
    dns_server.servfail.add("flaky.example")  # the message stays deferred in the queue
    r = make_relay(start=False, dns=dns_server.address)
    r.add_user(USER, PW)
    r.start()
    qid = r.submit(USER, PW, USER, ["bob@flaky.example"], b"Subject: hi\r\n\r\nhello\r\n")
    assert r.wait_event("delivery", qid=qid, result="deferred")
    ok(r.cli("user", "delete", USER))
    error_line(r.cli("domain", "remove", "mg.example.com"), 1, "0 credential(s) and 1 queued message(s)", "--force")
    ok(r.cli("domain", "remove", "mg.example.com", "--force"))


# ------------------------------------------------------------------ users

def test_users_added_by_cli_log_in_and_changes_apply_at_once(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    out = ok(inst.cli("user", "add", "App@MG.Example.com", "--password-stdin", input=PW + "\n"))
    assert out.startswith(f"added {USER}") and PW not in out
    out = ok(inst.cli("user", "add", "gen@mg.example.com", "--generate"))
    [generated] = re.findall(r"^password: (\S+)$", out, re.M)
    assert len(generated) >= 20 and out.count(generated) == 1  # printed exactly once
    data = json.loads(ok(inst.cli("user", "add", "json@mg.example.com", "--generate", "--json")))
    assert data["username"] == "json@mg.example.com" and len(data["password"]) >= 20
    assert users(inst) == [USER, "gen@mg.example.com", "json@mg.example.com"]
    assert store_verifies(inst, "json@mg.example.com", data["password"])

    with inst:
        assert can_login(inst, USER, PW)
        assert can_login(inst, "APP@mg.example.com", PW)  # usernames are case-insensitive
        assert can_login(inst, "gen@mg.example.com", generated)
        assert not can_login(inst, USER, "wrong password here")
        hits = inst.metrics_text()
        assert 'relay_auth_cache_total{result="hit"}' in hits  # the second login above was cached

        # Another process resets the password: the cached success must not outlive it.
        ok(inst.cli("user", "reset-password", USER, "--password-stdin", input="a brand new password\n"))
        assert not can_login(inst, USER, PW)
        assert can_login(inst, USER, "a brand new password")

        ok(inst.cli("user", "delete", "gen@mg.example.com"))
        assert not can_login(inst, "gen@mg.example.com", generated)


def test_user_add_without_terminal_or_flags(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    error_line(inst.cli("user", "add", USER, input=""), 2,
               "no terminal to prompt for a password: use --password-stdin or --generate")
    error_line(inst.cli("user", "add", USER, "--password-stdin", input=""), 2, "no password on standard input")
    assert users(inst) == []


def test_password_stdin_takes_one_line_without_its_ending(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    ok(inst.cli("user", "add", USER, "--password-stdin", input=PW + "\r\n"))
    assert store_verifies(inst, USER, PW)


def test_user_add_unknown_domain(inst):
    ok(inst.cli("domain", "add", "other.example"))
    # The hint is the command as this test ran it (the venv's script, with -c), ready to paste.
    error_line(inst.cli("user", "add", USER, "--generate"), 1, "not a sending domain",
               f"{relay_executable()[0]} -c {inst.config_path} domain add mg.example.com")
    error_line(inst.cli("user", "add", "not-an-address", "--generate"), 1, "full address")


@pytest.mark.parametrize("password,why", [
    ("short", "too short: at least 12 characters"),
    (USER, "must not equal the username"),
    ("aaaaaaaaaaaaaaaa", "too repetitive"),
])
def test_weak_password_exit_1(inst, password, why):
    ok(inst.cli("domain", "add", "mg.example.com"))
    error_line(inst.cli("user", "add", USER, "--password-stdin", input=password + "\n"), 1, why)
    assert users(inst) == []


def test_sixth_user_refused(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    for i in range(5):
        add_user(inst, f"app{i}@mg.example.com")
    error_line(inst.cli("user", "add", "app5@mg.example.com", "--password-stdin", input=PW + "\n"), 1,
               "already has 5 credentials (limit 5)")
    # Refused before any password is asked for: no terminal here, yet the answer is the limit.
    error_line(inst.cli("user", "add", "app5@mg.example.com", input=""), 1, "limit 5")
    error_line(inst.cli("user", "add", "app0@mg.example.com", "--generate"), 1, "already exists")
    assert len(users(inst)) == 5


def test_reset_password_and_delete(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    add_user(inst, USER)
    error_line(inst.cli("user", "reset-password", "nobody@mg.example.com", input=""), 1, "not found")
    error_line(inst.cli("user", "delete", "nobody@mg.example.com"), 1, "not found")
    error_line(inst.cli("user", "reset-password", USER, "--password-stdin", input="short\n"), 1, "too short")
    assert store_verifies(inst, USER, PW)
    out = ok(inst.cli("user", "reset-password", "APP@mg.example.com", "--generate"))
    [new] = re.findall(r"^password: (\S+)$", out, re.M)
    assert store_verifies(inst, USER, new) and not store_verifies(inst, USER, PW)
    assert ok(inst.cli("user", "delete", USER)).strip() == f"deleted {USER}"
    assert users(inst) == []
    error_line(inst.cli("user", "delete", USER), 1, "not found")


def test_user_list_all_and_by_domain(inst):
    for d in ("a.example", "b.example"):
        ok(inst.cli("domain", "add", d))
        if d == "a.example":
            assert ok(inst.cli("user", "list")).strip() == "no credentials"
    add_user(inst, "x@a.example")
    add_user(inst, "y@b.example")
    add_user(inst, "z@a.example")
    assert users(inst) == ["x@a.example", "z@a.example", "y@b.example"]
    assert users(inst, "A.Example") == ["x@a.example", "z@a.example"]
    table = ok(inst.cli("user", "list", "b.example")).splitlines()
    assert table[0].split()[:2] == ["USERNAME", "DOMAIN"] and table[1].split()[:2] == ["y@b.example", "b.example"]
    assert len(table) == 2
    error_line(inst.cli("user", "list", "c.example"), 1, "domain c.example not found")


# ------------------------------------------------------------------ interactive prompt (a real terminal)

def run_on_tty(argv: list[str], answers: list[tuple[str, str]], timeout: float = 30) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as its controlling terminal; answer each prompt in turn."""
    master, slave = os.openpty()

    def become_session_leader_with_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=become_session_leader_with_tty)
    os.close(slave)
    out, pos, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            while answers and answers[0][0].encode() in out[pos:]:
                pos = out.index(answers[0][0].encode(), pos) + len(answers[0][0])
                os.write(master, answers.pop(0)[1].encode())
        else:
            raise AssertionError(f"no exit within {timeout}s: {out!r}")
        return proc.wait(timeout=10), out.decode().replace("\r\n", "\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_interactive_prompt_asks_twice_without_echo(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    argv = relay_executable() + ["-c", str(inst.config_path), "user", "add", USER]
    rc, out = run_on_tty(argv, [(f"Password for {USER}", PW + "\n"), ("Repeat password:", PW + "\n")])
    assert rc == 0, out
    assert f"added {USER}" in out and PW not in out  # echo was off
    assert store_verifies(inst, USER, PW)


def test_interactive_prompt_mismatch_and_eof(inst):
    ok(inst.cli("domain", "add", "mg.example.com"))
    argv = relay_executable() + ["-c", str(inst.config_path), "user", "add", USER]
    rc, out = run_on_tty(argv, [("Password for", PW + "\n"), ("Repeat password:", PW + "x\n")])
    assert rc == 1 and "relay: passwords do not match" in out and "Traceback" not in out
    rc, out = run_on_tty(argv, [("Password for", "\x04")])  # Ctrl-D
    assert rc == 2 and "relay: no password entered" in out and "Traceback" not in out
    assert users(inst) == []


# ------------------------------------------------------------------ configuration

def test_check_config_masks_the_smarthost_password(inst):
    inst.config["delivery"].update(mode="smarthost", smarthost={
        "host": "smtp.example.net", "port": 465, "tls": "implicit", "username": "relay", "password": "s3cret-Pa55"})
    inst.write_config()
    out = ok(inst.cli("check-config"))
    assert out.startswith("# configuration is valid")
    assert "s3cret" not in out and 'password = "***"' in out
    effective = tomllib.loads(out)
    assert effective["delivery"]["smarthost"]["host"] == "smtp.example.net"
    assert effective["storage"]["path"] == inst.config["storage"]["path"]
    assert effective["limits"]["recipients"] == 100  # defaults are filled in
    # The printed effective config is itself a valid config file (password aside).
    expected = config_mod.load(inst.config_path)
    assert config_mod.from_dict(effective).delivery.smarthost.password == "***"
    effective["delivery"]["smarthost"]["password"] = "s3cret-Pa55"
    assert config_mod.from_dict(effective) == expected

    for argv in (["check-config", "--json"], ["--json", "check-config"]):
        out = ok(inst.cli(*argv))
        assert "s3cret" not in out
        data = json.loads(out)
        assert data["delivery"]["smarthost"]["password"] == "***"
        assert data["delivery"]["smarthost"]["username"] == "relay"


def test_check_config_refuses_half_a_certificate_pair(inst):
    Path(inst.config["tls"]["cert"]).write_text("-----BEGIN CERTIFICATE-----\n")
    error_line(inst.cli("check-config"), 2, "config error: tls.key:", "not found")


def test_relay_config_env_var_selects_the_file(inst, tmp_path):
    workdir = tmp_path / "elsewhere"  # no config/relay.toml here
    workdir.mkdir()

    def run(*argv: str, **env: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
        return subprocess.run(relay_executable() + list(argv), capture_output=True, text=True, timeout=60,
                              cwd=workdir, env={**environ, **env})

    data = json.loads(ok(run("check-config", "--json", RELAY_CONFIG=str(inst.config_path))))
    assert data["storage"]["path"] == inst.config["storage"]["path"]
    ok(run("domain", "add", "env.example", RELAY_CONFIG=str(inst.config_path)))
    assert [r["domain"] for r in json.loads(ok(inst.cli("domain", "list", "--json")))] == ["env.example"]
    # -c wins over the environment.
    other = RelayInstance(tmp_path / "other")
    data = json.loads(ok(run("-c", str(other.config_path), "check-config", "--json",
                             RELAY_CONFIG=str(inst.config_path))))
    assert data["storage"]["path"] == other.config["storage"]["path"]
    # A named file that does not exist is an error, and so is no file at all (tests/integration/
    # test_first_hour.py has the rest of the discovery).
    error_line(run("check-config", RELAY_CONFIG=str(workdir / "missing.toml")), 2,
               f"config error: {workdir / 'missing.toml'}: config file not found")
    error_line(run("check-config", "--json"), 2, "no config file")


COMMANDS = [
    ["check-config"], ["check-config", "--json"], ["serve"], ["domain", "add", "x.example"], ["domain", "list"],
    ["domain", "remove", "x.example", "--force"], ["user", "add", "a@x.example", "--generate"],
    ["user", "list"], ["user", "reset-password", "a@x.example", "--generate"], ["user", "delete", "a@x.example"],
    ["queue", "list"], ["cert", "selfsigned"],
]


def test_unknown_key_makes_every_command_exit_2(inst):
    inst.config["limits"]["recipent"] = 5  # a typo for "recipients"
    inst.write_config()
    for argv in COMMANDS:
        cp = inst.cli(*argv)
        line = error_line(cp, 2, "config error: limits.recipent: unknown key")
        assert "did you mean 'recipients'?" in line, argv
        assert cp.stdout == "", argv
    # Nothing was touched before the refusal.
    assert not Path(inst.config["storage"]["path"]).exists()
    assert not Path(inst.config["tls"]["key"]).exists()


def test_invalid_toml_and_bad_values_exit_2(inst):
    inst.config_path.write_text("[limits]\nrecipients = \n")
    for argv in (["check-config"], ["domain", "list"]):
        error_line(inst.cli(*argv), 2, f"config error: {inst.config_path}: invalid TOML")
    inst.config_path.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    error_line(inst.cli("domain", "list"), 2, "not UTF-8")
    inst.config_path.write_text("[limits]\nrecipients = 'x'\n")
    assert error_line(inst.cli("user", "list"), 2) == \
        "relay: config error: limits.recipients: expected an integer, got 'x'"


def test_database_problems_are_one_line(inst):
    path = Path(inst.config["storage"]["path"])
    path.mkdir(parents=True)
    error_line(inst.cli("domain", "list"), 1, f"database {path}: is a directory")
    path.rmdir()
    path.write_bytes(b"not a database " * 200)
    error_line(inst.cli("user", "list"), 1, f"database {path}: file is not a database")


# ------------------------------------------------------------------ certificates

def _san(cert_path: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_cert_selfsigned(inst):
    cert, key = inst.config["tls"]["cert"], inst.config["tls"]["key"]
    out = ok(inst.cli("cert", "selfsigned"))
    assert "relay.test" in out
    assert _san(cert) == ["relay.test"]  # server.hostname by default
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # a matching pair

    before = (Path(cert).read_bytes(), Path(key).read_bytes())
    error_line(inst.cli("cert", "selfsigned", "--hostname", "mail.example.org"), 1, "already exists", "--force")
    assert (Path(cert).read_bytes(), Path(key).read_bytes()) == before

    os.chmod(key, 0o644)  # e.g. restored from a backup with loose permissions
    ok(inst.cli("cert", "selfsigned", "--hostname", "Bücher.example", "--force"))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert Path(key).read_bytes() != before[1]
    assert _san(cert) == ["xn--bcher-kva.example"]
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)

    error_line(inst.cli("cert", "selfsigned", "--hostname", "not a host", "--force"), 2, "--hostname")


def test_cert_selfsigned_is_used_by_serve(inst):
    ok(inst.cli("cert", "selfsigned", "--hostname", "mail.example.org"))
    with inst:
        s = inst.smtp()
        try:
            der = s.sock.getpeercert(binary_form=True)
        finally:
            s.close()
    assert der == ssl.PEM_cert_to_DER_cert(Path(inst.config["tls"]["cert"]).read_text())
    assert not inst.events_named("self_signed_certificate")  # it used ours, made none
