"""tests/support/tools.py: every tool's Debian package is one .ci/run installs, so under
RELAY_REQUIRE_TOOLS=1 a test that needs it fails instead of skipping only when the install did."""
from __future__ import annotations

import re
from pathlib import Path

from tests.support import tools

CI_RUN = Path(__file__).resolve().parents[2] / ".ci" / "run"


def test_every_tool_package_is_installed_by_ci():
    m = re.search(r'^\s*pkgs="([^"]*)"', CI_RUN.read_text(), re.M)
    assert m, ".ci/run has no pkgs= line"
    installed = set(m.group(1).split())
    assert set(tools.PACKAGES.values()) <= installed, set(tools.PACKAGES.values()) - installed
    assert tools.PACKAGES["haproxy"] == "haproxy"
