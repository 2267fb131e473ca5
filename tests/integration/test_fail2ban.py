"""contrib/fail2ban: the filter, run by fail2ban-regex over lines the real relay wrote (issue 12, part 2)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support import tools
from tests.support.raw_smtp import connect, start_relay

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "relay.conf"
JAIL = ROOT / "contrib" / "fail2ban" / "jail.d" / "relay.conf"


def fail2ban_regex() -> str:
    found = shutil.which("fail2ban-regex")
    if found is None:
        tools.missing("fail2ban-regex not installed (.ci/run installs the fail2ban package)")
    return found


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_filter_matches_each_auth_failure_and_only_the_client_address(tmp_path, fmt):
    tool = fail2ban_regex()
    inst = start_relay(tmp_path, config={"logging": {"format": fmt}, "limits": {"auth_failures": 3}})
    try:
        for _ in range(4):  # 3 failures, then refused as locked (not a failure: no password checked)
            with connect(inst, source="127.0.9.1").secure() as c:
                c.auth_plain(USER, "wrong password")
        # A username crafted to look like another client's failure line.
        with connect(inst, source="127.0.9.2").secure() as c:
            evil = 'x" client=10.6.6.6 mechanism=PLAIN result=failure user="y'
            assert c.auth_plain(evil, "wrong").is_(replies.AUTH_INVALID)
        with connect(inst, source="127.0.9.3").secure() as c:
            assert c.auth_plain(USER, PASSWORD).is_(replies.AUTH_OK)
        assert inst.wait_event("auth", count=4, result="failure")
        assert inst.events_named("auth", result="locked", client="127.0.9.1")
    finally:
        inst.stop()
    log = tmp_path / f"relay.{fmt}.log"
    log.write_text("\n".join(inst.raw_log) + "\n")
    out = subprocess.run([tool, "-o", "ip", str(log), str(FILTER)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["127.0.9.1"] * 3 + ["127.0.9.2"], out.stdout
    # The same lines behind a syslog prefix (a file fed by rsyslog from the journal).
    prefixed = tmp_path / "relay.syslog.log"
    prefixed.write_text("".join(f"Dec  1 22:40:03 mail relay[4242]: {line}\n" for line in inst.raw_log))
    out = subprocess.run([tool, "-o", "ip", str(prefixed), str(FILTER)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["127.0.9.1"] * 3 + ["127.0.9.2"], out.stdout


def test_jail_names_the_filter_and_bans_above_the_relays_own_budget():
    import configparser
    jail = configparser.ConfigParser()
    jail.read(JAIL)
    assert jail["relay"]["filter"] == "relay"
    from relay.config import LimitsConfig
    assert int(jail["relay"]["maxretry"]) > LimitsConfig().auth_failures
