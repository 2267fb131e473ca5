"""External tools some tests drive (swaks, msmtp, openssl, testssl.sh, promtool, systemd-analyze,
unbound: the DNSSEC-validating resolver of the DANE tests, tests/support/dnssec.py).

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


# Debian package of each tool whose name differs from it, for the skip reason; .ci/run installs them.
PACKAGES = {"promtool": "prometheus", "systemd-analyze": "systemd", "testssl.sh": "testssl.sh",
            "unbound": "unbound"}


def needs(*tools: str, reason: str | None = None) -> pytest.MarkDecorator:
    """Mark a test as driving these programs (looked up on PATH when the test starts)."""
    return pytest.mark.needs_tools(*tools, reason=reason)


def check_marker(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_tools"):
        absent = [t for t in mark.args if shutil.which(t) is None]
        if absent:
            why = mark.kwargs.get("reason") or "CI installs it"
            pkgs = " ".join(PACKAGES.get(t, t) for t in absent)
            missing(f"{', '.join(absent)} not installed ({why}; apt-get install {pkgs})")
