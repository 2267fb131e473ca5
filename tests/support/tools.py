"""External tools some tests drive (swaks, msmtp, openssl, testssl.sh, promtool, systemd-analyze, chromium,
haproxy, unbound: the DNSSEC-validating resolver of the DANE tests, tests/support/dnssec.py; postgresql:
tests/support/postgres.py).

Where a tool is absent its tests skip and say why, so `make test` works on a bare machine. Under
RELAY_REQUIRE_TOOLS=1 (set by .ci/run once it has installed them) they FAIL instead: a failed
install must not leave CI green with those tests quietly skipped. `missing()` is the one place
that decision is made; `needs()` marks a test and the conftest hook calls `missing()`.
"""
from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRE_ENV = "RELAY_REQUIRE_TOOLS"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def missing(reason: str) -> NoReturn:
    """A tool (or a capability of one) this test needs is not here: skip, or fail under the flag."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: tools must be installed)", pytrace=False)
    pytest.skip(reason)


# Debian packages for the tools tests name by program (.ci/run installs these).
PACKAGES = {"swaks": "swaks", "msmtp": "msmtp", "openssl": "openssl", "promtool": "prometheus",
            "systemd-analyze": "systemd", "testssl": "testssl.sh", "testssl.sh": "testssl.sh",
            "fail2ban-regex": "fail2ban", "chromium": "chromium", "haproxy": "haproxy",
            "unbound": "unbound", "initdb": "postgresql", "pg_ctl": "postgresql"}


def needs(*tools: str, reason: str | None = None) -> pytest.MarkDecorator:
    """Mark a test as driving these programs (looked up on PATH when the test starts)."""
    return pytest.mark.needs_tools(*tools, reason=reason)


def check_marker(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_tools"):
        absent = [t for t in mark.args if shutil.which(t) is None]
        if absent:
            pkgs = sorted({PACKAGES[t] for t in absent if t in PACKAGES})
            why = mark.kwargs.get("reason") or (f"Debian package {', '.join(pkgs)}; CI installs it" if pkgs
                                                 else "CI installs it")
            missing(f"{', '.join(absent)} not installed ({why})")


CHROMIUM_ENV = "RELAY_TEST_CHROMIUM"


def chromium() -> str:
    """Debian's browser (apt package `chromium`, installed by .ci/run) for tests/browser/, and
    PyPI Playwright to drive it (the `test` extra): the path, or skip/fail as above."""
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        missing(f"chromium not installed at {path} (.ci/run installs the apt package; or set {CHROMIUM_ENV})")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing("PyPI playwright not installed (pip install -e '.[test]')")
    return path


def postgresql() -> str:
    """The directory with Debian's PostgreSQL server programs (apt package `postgresql`,
    installed by .ci/run; initdb and pg_ctl live in /usr/lib/postgresql/<version>/bin), and
    asyncpg to talk to it: the directory, or skip/fail as above."""
    from tests.support.postgres import binaries
    found = binaries()
    if found is None:
        missing("postgresql not installed (initdb, pg_ctl; .ci/run installs the apt package)")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        missing("asyncpg not installed (pip install -e .)")
    return found
