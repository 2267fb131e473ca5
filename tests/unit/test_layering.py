"""The layering rules that an import list can show (docs/architecture.md, Boundaries): the HTTP
API reaches storage and SMTP only through the operations layer; the operations layer never
reaches the SMTP server side, and never a front end."""
from __future__ import annotations

import ast
from pathlib import Path

import relay

ROOT = Path(relay.__file__).parent


def imports(package: str) -> dict[str, set[str]]:
    """Module file -> the absolute module names it imports (relative imports resolved)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        mod = "relay." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod.removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    names.add(".".join(base + ([node.module] if node.module else [])))
                else:
                    names.add(node.module or "")
        out[str(path.relative_to(ROOT))] = names
    return out


FORBIDDEN_FOR_API = ("relay.store", "relay.credentials", "relay.dkim_keys", "relay.db", "relay.server",
                     "relay.delivery", "relay.queue_runner", "sqlite3", "aiosqlite", "aiosmtpd", "aiosmtplib")


def test_the_api_goes_through_the_operations_layer_only():
    for path, names in imports("api").items():
        bad = sorted(n for n in names if n.startswith(FORBIDDEN_FOR_API))
        assert not bad, f"relay/{path} imports {bad}: call relay.operations instead"


def test_the_operations_layer_knows_no_front_end_and_no_smtp_server():
    for path, names in imports("operations").items():
        bad = sorted(n for n in names if n.startswith(("relay.api", "relay.admin", "relay.cli", "relay.server",
                                                       "aiohttp", "sqlite3", "aiosqlite")))
        assert not bad, f"relay/{path} imports {bad}"


def test_delivery_sees_no_store_but_the_tls_state_protocol():
    """Outbound: bytes and an envelope in, outcomes out. The TLS policy's store (MTA-STS cache,
    downgrade memory) reaches it only as the `TLSState` Protocol, injected into the Router."""
    for path, names in imports("delivery").items():
        bad = sorted(n for n in names if n.startswith(("relay.store", "relay.db", "relay.credentials",
                                                       "relay.queue_runner", "relay.server", "sqlite3", "aiosqlite"))
                     and n != "relay.store.contract")
        assert not bad, f"relay/{path} imports {bad}"
