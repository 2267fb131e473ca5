"""The web admin's layering (docs/architecture.md): its pages reach the domains, credentials and
queue only through the operations layer, and nothing in relay/admin/ reaches the SMTP server
side, delivery or the HTTP API's insides (the daemon hands it the API application)."""
from __future__ import annotations

from tests.unit.test_layering import imports

FORBIDDEN_FOR_PAGES = ("relay.store", "relay.db", "relay.dkim_keys", "relay.queue_store", "relay.server",
                       "relay.delivery", "relay.queue_runner", "sqlite3", "aiosqlite", "aiosmtpd", "aiosmtplib")
FORBIDDEN_FOR_ADMIN = ("relay.server", "relay.delivery", "relay.queue_runner", "relay.api", "relay.cli",
                       "aiosmtpd", "aiosmtplib")

# The admin's listener reports a failed bind in the same one line as the SMTP listeners.
ALLOWED = {"admin/server.py": {"relay.server.listeners"}}


def test_admin_pages_go_through_the_operations_layer_only():
    found = imports("admin")
    assert any(p.startswith("admin/views/") for p in found)
    for path, names in found.items():
        if path.startswith("admin/views/"):
            bad = sorted(n for n in names if n.startswith(FORBIDDEN_FOR_PAGES))
            assert not bad, f"relay/{path} imports {bad}: call relay.operations (or admin/accounts, sessions)"


def test_the_admin_knows_no_smtp_server_delivery_or_api_internals():
    for path, names in imports("admin").items():
        bad = sorted(n for n in names if n.startswith(FORBIDDEN_FOR_ADMIN) and n not in ALLOWED.get(path, ()))
        assert not bad, f"relay/{path} imports {bad}"
