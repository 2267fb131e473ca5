"""Shared fixtures: real peers on loopback (DNS server, MX sink) and the real relay process."""
from __future__ import annotations

import pytest

from tests.support.dns_server import DNSServer
from tests.support.mx_sink import MXSink
from tests.support import tools
from tests.support.relay_instance import RelayInstance

USER = "app@mg.example.com"
PASSWORD = "correct horse battery staple"


def pytest_runtest_setup(item):
    tools.check_marker(item)  # tests marked tools.needs(...): skip, or fail under RELAY_REQUIRE_TOOLS=1


@pytest.fixture
def dns_server():
    with DNSServer({}) as server:
        yield server


@pytest.fixture
def mx_sink():
    with MXSink() as sink:
        yield sink


@pytest.fixture
def make_relay(tmp_path):
    """Factory: make_relay(**kwargs) -> started RelayInstance; all are stopped at teardown."""
    started: list[RelayInstance] = []

    def factory(start: bool = True, name: str = "relay", **kwargs) -> RelayInstance:
        inst = RelayInstance(tmp_path / name, **kwargs)
        started.append(inst)
        return inst.start() if start else inst

    yield factory
    for inst in started:
        inst.kill()


@pytest.fixture
def relay(make_relay):
    """A running relay with one credential (USER / PASSWORD) and no reachable MX."""
    inst = make_relay(start=False)
    inst.add_user(USER, PASSWORD)
    return inst.start()


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL for the session (tests/support/postgres.py); each test that
    uses it gets its own database."""
    bindir = tools.postgresql()
    from tests.support.postgres import PostgresServer
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def store_backend(request, tmp_path):
    """The store contract's backends: SQLite always, PostgreSQL when installed (skipped with a
    reason otherwise, failed under RELAY_REQUIRE_TOOLS=1)."""
    from tests.support.backends import PostgresBackend, SQLiteBackend
    if request.param == "sqlite":
        backend = await SQLiteBackend(tmp_path).start()
    else:
        backend = await PostgresBackend(request.getfixturevalue("pg_server")).start()
    yield backend
    await backend.close()
