"""SMTP credentials: list, create (the per-domain cap checked inside the INSERT's own
transaction), reset, delete; each change with its audit row in the same transaction.

Passwords: the caller's, checked by the store's rules, or generated here when none is given
(`secrets.token_urlsafe`); a password leaves this layer only once, in the create/reset answer.
argon2 runs in the store's executor, never on the event loop.
"""
from __future__ import annotations

from ..credentials import CredentialStore, generate_password, normalize_username
from .audit import Audit
from .errors import not_found, translated
from .model import Actor, CredentialInfo


def _info(r: dict) -> CredentialInfo:
    return CredentialInfo(username=r["username"], domain=r["domain"], created_at=r["created_at"],
                          updated_at=r["updated_at"], last_login=r["last_login"],
                          last_failed_login=r.get("last_failed_login"))


class Credentials:
    def __init__(self, creds: CredentialStore, audit: Audit):
        self._creds = creds
        self._audit = audit

    def normal(self, username: str) -> tuple[str, str]:
        with translated():
            return normalize_username(username)

    async def list(self, domain: str | None = None) -> list[CredentialInfo]:
        with translated():
            return [_info(r) for r in await self._creds.list_users(domain)]

    async def get(self, username: str) -> CredentialInfo:
        user, domain = self.normal(username)
        for c in await self.list(domain):
            if c.username == user:
                return c
        raise not_found(f"credential {user} not found")

    async def check_can_add(self, username: str) -> tuple[str, str]:
        """The refusals a create would give that need no password (for the CLI, before it prompts)."""
        with translated():
            return await self._creds.check_can_add(username)

    async def exists(self, username: str) -> bool:
        return await self._creds.lookup(username) is not None

    async def create(self, actor: Actor, username: str, password: str | None = None) -> tuple[CredentialInfo, str]:
        user, _ = self.normal(username)
        generated = password is None
        pw = generate_password() if password is None else password
        with translated():
            await self._creds.add_user(user, pw, also=self._audit.row(
                actor, "credential.create", user, "generated password" if generated else "password given"))
        return await self.get(user), pw

    async def reset(self, actor: Actor, username: str, password: str | None = None) -> str:
        user, _ = self.normal(username)
        generated = password is None
        pw = generate_password() if password is None else password
        with translated():
            await self._creds.reset_password(user, pw, also=self._audit.row(
                actor, "credential.reset", user, "generated password" if generated else "password given"))
        return pw

    async def delete(self, actor: Actor, username: str) -> None:
        user, _ = self.normal(username)
        with translated():
            await self._creds.delete_user(user, also=self._audit.row(actor, "credential.delete", user))
