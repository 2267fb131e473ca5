"""What users see of the state nodes share (issue 17), over real sockets: two relay nodes
in-process (each its own listener, credential store with its own verify cache, queue store and
AUTH throttle, on one database), driven with smtplib over STARTTLS.

On PostgreSQL the nodes are two; on SQLite (one node) both "nodes" are the same one, so the
same assertions state what single-node does. The CLI reset/delete is the credential store's
call on node 1 (what `relay user reset` runs through the operations layer)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import ssl
from dataclasses import dataclass

import pytest

from relay import config as config_mod, replies, tls
from relay.daemon import settings_from
from relay.server import listeners
from relay.server.auth import AuthThrottle
from relay.server.session import ServerState

USER = "app@mg.example.com"
PW = "correct horse battery staple"
NEW = "another horse battery staple"
FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}


@dataclass
class Node:
    state: ServerState
    port: int
    bound: list

    def close(self) -> None:
        for b in self.bound:
            b.server.close()
        for s in list(self.state.sessions):
            if s.transport is not None:
                s.transport.abort()


def make_cfg(**limits):
    return config_mod.from_dict({
        "server": {"hostname": "relay.example.com"},
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "starttls"}],
        "limits": {"auth_failure_delay": 0, **limits},
        "credentials": FAST,
    })


async def start_node(backend, tmp_path, name: str, cfg, *, credentials=None, budgets=None, pool=None) -> Node:
    cert, key = str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key")
    tls.write_self_signed(cert, key, "relay.example.com")
    creds = credentials or await backend.credentials(cfg.credentials, fresh_connection=True)
    queue = await backend.store(fresh_connection=True)
    if budgets is None:
        budgets = await backend.auth_budgets()
    state = ServerState(settings=settings_from(cfg), credentials=creds, queue=queue,
                        tls_context=tls.server_context(cert, key), throttle=AuthThrottle(cfg.limits, shared=budgets))
    bound = await listeners.start(state, cfg.listeners)
    return Node(state, bound[0].port, bound)


@contextlib.asynccontextmanager
async def two_nodes(backend, tmp_path, **limits):
    cfg = make_cfg(**limits)
    n1 = await start_node(backend, tmp_path, "n1", cfg)
    n2 = await start_node(backend, tmp_path, "n2", cfg) if backend.name == "postgres" else n1
    await n1.state.credentials.add_domain("mg.example.com")
    await n1.state.credentials.add_user(USER, PW)
    try:
        yield n1, n2
    finally:
        for n in {id(n1): n1, id(n2): n2}.values():
            n.close()


class Client:
    """smtplib in a worker thread (the nodes run on this test's loop)."""

    def __init__(self, port: int):
        self.port = port
        self.smtp: smtplib.SMTP | None = None

    def _open(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
        self.smtp.ehlo("client.example")
        self.smtp.starttls(context=ctx)
        self.smtp.ehlo("client.example")

    def _auth(self, user: str, password: str) -> int:
        assert self.smtp is not None
        self.smtp.user, self.smtp.password = user, password
        try:
            code, _ = self.smtp.auth("PLAIN", self.smtp.auth_plain, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        return code

    async def open(self) -> "Client":
        await asyncio.to_thread(self._open)
        return self

    async def auth(self, user: str, password: str) -> int:
        return await asyncio.to_thread(self._auth, user, password)

    async def cmd(self, line: str) -> tuple[int, bytes]:
        assert self.smtp is not None
        return await asyncio.to_thread(self.smtp.docmd, line)

    async def close(self) -> None:
        if self.smtp is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.smtp.quit)
            with contextlib.suppress(Exception):
                self.smtp.close()


async def login(port: int, user: str, password: str) -> int:
    c = await Client(port).open()
    try:
        return await c.auth(user, password)
    finally:
        await c.close()


async def test_a_reset_on_node_1_refuses_the_old_password_on_node_2_at_the_next_auth(store_backend, tmp_path):
    async with two_nodes(store_backend, tmp_path) as (n1, n2):
        assert await login(n2.port, USER, PW) == 235
        assert await login(n2.port, USER, PW) == 235  # served from node 2's verify cache now
        await n1.state.credentials.reset_password(USER, NEW)
        assert await login(n2.port, USER, PW) == 535
        assert await login(n2.port, USER, NEW) == 235
        await n1.state.credentials.delete_user(USER)
        assert await login(n2.port, USER, NEW) == 535


@pytest.mark.parametrize("change", ["delete", "reset"])
async def test_an_open_session_on_node_2_is_refused_at_the_next_mail(store_backend, tmp_path, change):
    async with two_nodes(store_backend, tmp_path) as (n1, n2):
        c = await Client(n2.port).open()
        try:
            assert await c.auth(USER, PW) == 235
            assert (await c.cmd(f"MAIL FROM:<{USER}>"))[0] == 250
            assert (await c.cmd("RSET"))[0] == 250
            if change == "delete":
                await n1.state.credentials.delete_user(USER)
                expected = replies.CREDENTIAL_REVOKED
            else:
                await n1.state.credentials.reset_password(USER, NEW)
                expected = replies.CREDENTIAL_CHANGED
            code, text = await c.cmd(f"MAIL FROM:<{USER}>")
            assert (code, text.decode()) == (expected.code, f"{expected.status} {expected.text}")
            # The login is gone from the session: the next MAIL needs AUTH again.
            assert (await c.cmd(f"MAIL FROM:<{USER}>"))[0] == replies.AUTH_REQUIRED.code
        finally:
            await c.close()


async def test_guesses_over_both_nodes_share_one_budget(store_backend, tmp_path):
    """auth_failures = 4 per (network, username): wrong passwords alternating between the nodes
    get 535 four times, then 454 on both nodes, the right password included."""
    async with two_nodes(store_backend, tmp_path, auth_failures=4) as (n1, n2):
        codes = [await login((n1, n2)[i % 2].port, USER, f"guess {i}") for i in range(8)]
        for n in (n1, n2):
            await n.state.throttle.settled()
        assert codes == [535] * 4 + [454] * 4
        assert await login(n1.port, USER, PW) == 454
        assert await login(n2.port, USER, PW) == 454


async def test_auth_fails_closed_when_the_database_is_unreachable(store_backend, tmp_path):
    """The shared budgets cannot be asked: 454 4.7.0, not an unlimited guess; AUTH works again
    when the link returns."""
    if store_backend.name != "postgres":
        pytest.skip("SQLite has no link to lose")
    import asyncpg
    from relay.store.pg_credentials import PgCredentialStore
    from relay.store.shared_auth import PgAuthBudgets
    from tests.support.tcp_cut import CuttableProxy
    cfg = make_cfg()
    host, port = store_backend.dsn.split("@", 1)[1].split("/", 1)[0].split(":")
    async with CuttableProxy(host, int(port)) as proxy:
        dsn = store_backend.dsn.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        await (await store_backend.credentials(cfg.credentials)).add_domain("mg.example.com")
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=4)
        node = None
        try:
            creds = PgCredentialStore(pool, cfg.credentials, timeout=3)
            await creds.add_user(USER, PW)
            node = await start_node(store_backend, tmp_path, "n1", cfg, credentials=creds,
                                    budgets=PgAuthBudgets(pool, timeout=2))
            assert await login(node.port, USER, PW) == 235
            proxy.cut()
            c = await Client(node.port).open()
            try:
                blob = base64.b64encode(f"\0{USER}\0{PW}".encode()).decode()
                code, text = await c.cmd(f"AUTH PLAIN {blob}")
                assert (code, text.decode()) == (454, f"4.7.0 {replies.AUTH_UNAVAILABLE.text}")
            finally:
                await c.close()
            proxy.restore()
            await proxy.restored()
            assert await login(node.port, USER, PW) == 235
        finally:
            if node is not None:
                node.close()
            pool.terminate()
