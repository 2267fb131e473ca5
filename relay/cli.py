"""The `relay` command: serve, check-config, domain, user, queue, cert, admin.

Human tables by default, `--json` for scripts. Exit codes: 0 ok, 1 not found or refused,
2 usage or configuration error. Every error is one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence

from . import __version__, config as config_mod, db
from .config import Config, ConfigError
from .credentials import (NotFound, StoreError, display_domain, generate_password, normalize_domain,
                          normalize_username, password_problem)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus 'relay domain: error: ...' (two lines); scripts and people
    grep for one line starting with 'relay: ', like every other error of ours."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"relay: {message} (see: {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# The command as the user ran it (set once by main, like argparse's prog): hints must be
# pasteable as they are, and a bare `relay` is wrong for someone who ran .venv/bin/relay, or
# who needed -c to reach this config.
PROG = "relay"
_HINT = re.compile(r"\brelay (?=(?:domain|user|queue|cert|admin|check-config|status|serve)\b)")


def invoked_as(argv0: str, config_flag: str | None) -> str:
    name = os.path.basename(argv0)
    if name == "__main__.py":
        prog = f"{os.path.basename(sys.executable)} -m relay"
    else:
        found = shutil.which(name)
        prog = name if found and os.path.realpath(found) == os.path.realpath(argv0) else shlex.quote(argv0)
    if config_flag is not None:
        prog += " -c " + shlex.quote(config_flag)
    return prog


def hint(text: str) -> str:
    """Rewrite 'relay <command> ...' hints (ours and the stores') to the command actually run."""
    return _HINT.sub(lambda m: PROG + " ", text)


# ---------------------------------------------------------------- output helpers

def _fmt_attempt_tls(h: dict) -> str:
    """' [host, TLSv1.3 TLS_AES_256_GCM_SHA384 verified, policy sts-enforce]' for an attempt's history line."""
    if not h.get("host") and not h.get("tls") and not h.get("tls_policy"):
        return ""
    tls = " ".join(x for x in (h.get("tls"), h.get("tls_cipher")) if x)
    if h.get("tls_verified") is not None and h.get("tls") not in (None, "plain", "failed", "unavailable"):
        tls += " verified" if h["tls_verified"] else " unverified"
    parts = [p for p in (h.get("host"), tls, f"policy {h['tls_policy']}" if h.get("tls_policy") else "") if p]
    return f"  [{', '.join(parts)}]"


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _fmt_age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _fmt_span(seconds: float) -> str:
    s = int(seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"


def warn(cfg: Config) -> None:
    """DNS-facing settings receivers cannot use: one stderr line each (stdout stays parseable)."""
    for line in config_mod.dns_warnings(cfg):
        print(f"relay: warning: {line}", file=sys.stderr)


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(human)


# ---------------------------------------------------------------- password input

def read_password(args: argparse.Namespace, username: str, min_length: int) -> tuple[str, bool]:
    """(password, generated). Interactive prompts ask twice."""
    if getattr(args, "generate", False):
        return generate_password(), True
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        # One line; its ending (\n or \r\n from a Windows editor or `echo` in some shells) is not part of it.
        pw = line.removesuffix("\n").removesuffix("\r")
        if not pw:
            raise CLIError("no password on standard input", EXIT_USAGE)
        return pw, False
    if not sys.stdin.isatty():
        raise CLIError("no terminal to prompt for a password: use --password-stdin or --generate", EXIT_USAGE)
    try:
        first = getpass.getpass(f"Password for {username} (at least {min_length} characters): ")
        # Say what is wrong with the first entry before asking for it a second time.
        problem = password_problem(username, first, min_length)
        if problem:
            raise CLIError(problem)
        second = getpass.getpass("Repeat password: ")
    except EOFError:  # Ctrl-D at the prompt
        raise CLIError("no password entered", EXIT_USAGE) from None
    if first != second:
        raise CLIError("passwords do not match")
    return first, False


# ---------------------------------------------------------------- commands

def require_database(cfg: Config) -> None:
    """Only `serve` and `domain add` create the database: anything else finding none is looking
    in the wrong place (another directory, another config), and an empty new one would answer
    'no credentials' or 'queue is empty' as if all were well."""
    if cfg.storage.backend == "postgres":
        return  # the DSN names a database the sysadmin made: opening it fails loudly if it is not there
    path = Path(cfg.storage.path)
    if not path.exists():
        where = "" if path.is_absolute() else f", relative to the current directory {Path.cwd()}"
        raise CLIError(f"database {path.absolute()} does not exist (storage.path in {CONFIG_PATH}{where}); "
                       f"wrong directory or config? `{PROG} serve` or `{PROG} domain add <DOMAIN>` creates it")


CONFIG_PATH = "?"  # the config file in use, for messages (set by main)


def cli_actor() -> "Actor":
    """The audit log's who for a CLI command: the OS user running it."""
    from .operations import Actor
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        name = f"uid {os.getuid()}"
    return Actor(name, "cli")


def _with_ops(cfg: Config, fn, create: bool = False) -> int:
    from .operations import Operations
    if not create:
        require_database(cfg)

    async def run() -> int:
        async with Operations.opened(cfg, role="cli") as ops:
            return await fn(ops)

    return asyncio.run(run())


def cmd_domain(args: argparse.Namespace, cfg: Config) -> int:
    from . import dkim_keys
    from .operations import Operations
    actor = cli_actor()

    async def run(ops: Operations) -> int:
        if args.action == "add":
            # --no-dkim: for mail signed further on (a smarthost that signs) or not at all.
            info, key = await ops.domains.add(actor, args.domain, dkim=not args.no_dkim,
                                              algorithm=args.dkim_algorithm, selector=args.selector)
            d = info.name
            emit(args, {"domain": d, "display": display_domain(d), "dkim_selector": key.selector if key else None,
                        "dkim_algorithm": key.algorithm if key else None},
                 f"added domain {display_domain(d)}" + (f" ({d})" if display_domain(d) != d else "")
                 + (f" with DKIM key {key.selector} ({key.algorithm})" if key
                    else f" without a DKIM key (add one later: {PROG} domain dkim rotate {d})")
                 + f"\nnext: publish the records `{PROG} domain dns {d}` prints, then `{PROG} domain verify {d}`,"
                 + f"\n      and create a credential: {PROG} user add app@{d} --generate")
        elif args.action == "list":
            rows = [{"domain": i.name, "display": i.display, "credentials": i.credentials, "created_at": i.created_at,
                     "verified_at": i.verified_at, "state": i.state, "dkim_selector": i.dkim_selector}
                    for i in await ops.list_domains()]
            emit(args, rows, table(
                [[r["display"] + (f" ({r['domain']})" if r["display"] != r["domain"] else ""), r["credentials"],
                  r["state"] + (f" {_fmt_time(r['verified_at'])}" if r["verified_at"] else ""),
                  r["dkim_selector"] or "-", _fmt_time(r["created_at"])] for r in rows],
                ["DOMAIN", "CREDENTIALS", "STATE", "DKIM", "CREATED"]) if rows else f"no domains; add one: {PROG} domain add <DOMAIN>")
        elif args.action == "remove":
            n = await ops.remove_domain(actor, args.domain, force=args.force)
            d = normalize_domain(args.domain)
            emit(args, {"domain": d, "removed_credentials": n}, f"removed domain {d} ({n} credential(s) removed)")
        elif args.action == "dkim":
            d = normalize_domain(args.domain)
            if args.dkim_action == "rotate":
                key = await ops.domains.rotate_dkim(actor, d, algorithm=args.dkim_algorithm, selector=args.selector)
                emit(args, {"domain": d, "selector": key.selector, "algorithm": key.algorithm, "txt": key.txt},
                     f"new active DKIM key {key.selector} for {d}; publish:\n{key.record_name}. IN TXT "
                     f"{dkim_keys.txt_chunks(key.txt)}\nthe previous key stays published-but-unused until "
                     f"`{PROG} domain dkim remove {d} <OLD-SELECTOR>`; run `{PROG} domain verify {d}` once published")
            elif args.dkim_action == "remove":
                await ops.domains.dkim_keys(d)  # "domain not found" first, as before
                await ops.domains.remove_dkim(actor, d, args.selector_name)
                emit(args, {"domain": d, "removed": args.selector_name},
                     f"removed DKIM key {args.selector_name} of {d}; its TXT record can go now")
            else:
                keys = await ops.domains.dkim_keys(d)
                emit(args, [{"selector": k.selector, "algorithm": k.algorithm, "active": k.active,
                             "created_at": k.created_at, "record": k.record_name} for k in keys],
                     table([[k.selector, k.algorithm, "active" if k.active else "retired", _fmt_time(k.created_at)]
                            for k in keys], ["SELECTOR", "ALGORITHM", "STATE", "CREATED"]) if keys else "no DKIM keys")
        elif args.action == "dns":
            recs = await ops.domain_records(args.domain)
            warn(cfg)
            if getattr(args, "json", False):
                print(json.dumps([{"name": r.name, "type": r.type, "value": r.value, "purpose": r.purpose,
                                   "required": r.required} for r in recs], indent=2))
            elif args.zone:
                print(await ops.zone_snippet(args.domain), end="")
            else:
                print(table([[r.purpose, r.type, r.name, r.value] for r in recs], ["PURPOSE", "TYPE", "NAME", "VALUE"]))
                print("\nzone file snippet (also: --zone):\n" + await ops.zone_snippet(args.domain), end="")
        elif args.action == "verify":
            d = normalize_domain(args.domain)
            checks = await ops.check_domain(actor, d)
            ok = all(c.lookup == "ok" for c in checks if c.required)
            data = {"domain": d, "verified": ok, "records": [
                {"purpose": c.purpose, "name": c.name, "status": c.lookup, "expected": c.expected,
                 "found": list(c.found), "required": c.required} for c in checks]}
            lines = []
            for c in checks:
                label = {"ok": "found and correct", "different": "found but different", "missing": "missing",
                         "error": "lookup failed"}[c.lookup]
                lines.append(f"{c.purpose:<34} {c.name:<40} {label}")
                if c.lookup == "different":
                    lines.append(f"    expected: {c.expected}")
                    lines.extend(f"    found:    {f}" for f in c.found)
                elif c.lookup == "missing":
                    lines.append(f"    publish:  {c.expected}")
            lines.append(f"\n{d}: " + ("verified: DKIM and SPF are right" if ok else
                                        "NOT verified: DKIM and SPF must both be right"))
            emit(args, data, "\n".join(lines))
            return EXIT_OK if ok else EXIT_REFUSED
        return EXIT_OK

    return _with_ops(cfg, run, create=args.action == "add")


def cmd_user(args: argparse.Namespace, cfg: Config) -> int:
    from .operations import Operations
    actor = cli_actor()

    async def run(ops: Operations):
        if args.action == "list":
            rows = [{"username": c.username, "domain": c.domain, "created_at": c.created_at,
                     "updated_at": c.updated_at, "last_login": c.last_login, "last_failed_login": c.last_failed_login}
                    for c in await ops.list_credentials(args.domain)]
            emit(args, rows, table([[r["username"], r["domain"], _fmt_time(r["created_at"]), _fmt_time(r["updated_at"]),
                                     _fmt_time(r["last_login"])] for r in rows],
                                   ["USERNAME", "DOMAIN", "CREATED", "PASSWORD SET", "LAST LOGIN"])
                 if rows else "no credentials")
            return EXIT_OK
        user, domain = normalize_username(args.username)
        if args.action == "delete":
            await ops.delete_credential(actor, user)
            emit(args, {"username": user, "deleted": True}, f"deleted {user}")
            return EXIT_OK
        if args.action == "add":
            # Refuse what needs no password (unknown domain, duplicate, limit) before asking for one.
            await ops.credentials.check_can_add(user)
        elif not await ops.credentials.exists(user):
            raise NotFound(f"credential {user} not found")
        password, generated = read_password(args, user, cfg.credentials.min_password_length)
        if args.action == "add":
            _, password = await ops.create_credential(actor, user, None if generated else password)
            verb = "added"
        else:
            password = await ops.reset_credential(actor, user, None if generated else password)
            verb = "password reset for"
        data = {"username": user, "domain": domain}
        human = f"{verb} {user}"
        if generated:
            data["password"] = password
            human += f"\npassword: {password}\n(shown once; store it in the application's SMTP settings now)"
        emit(args, data, human)
        return EXIT_OK
    return _with_ops(cfg, run)


def shorten(text: str | None, width: int = 60) -> str:
    """Cut at a word boundary and say so with an ellipsis, so a cut reply is not misread as whole."""
    if not text:
        return "-"
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    if " " in cut[width // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "\u2026"


def cmd_queue(args: argparse.Namespace, cfg: Config) -> int:
    from .operations import Operations
    retention = cfg.storage.finished_retention
    actor = cli_actor()

    async def run(ops: Operations):
        q = ops.queue
        if args.action == "list" and not args.all:
            rows = await q.rows()
            finished = bool(await q.rows(finished=True))
            emit(args, rows, (table(
                [[r["id"], _fmt_age(r["created_at"]), r["sender"] or "<>", ",".join(r["recipients"]), r["state"],
                  _fmt_time(r["next_attempt_at"]), shorten(r["last_error"])] for r in rows],
                ["ID", "AGE", "SENDER", "RECIPIENTS", "STATE", "NEXT ATTEMPT", "LAST ERROR"]) if rows else "queue is empty")
                + (f"\n(finished in the last {_fmt_span(retention)}: {PROG} queue history)"
                   if finished and not getattr(args, "json", False) else ""))
            return EXIT_OK
        if args.action in ("list", "history"):
            # --all: what is queued, then what finished within storage.finished_retention.
            rows = (await q.rows() if args.action == "list" else []) + await q.rows(finished=True)
            emit(args, rows, table(
                [[r["id"], _fmt_time(r["finished_at"]) if r["finished_at"] else "queued", r["sender"] or "<>",
                  ",".join(r["recipients"]), r["state"], shorten(r["last_error"])] for r in rows],
                ["ID", "FINISHED", "SENDER", "RECIPIENTS", "OUTCOME", "LAST REPLY"]) if rows else
                 f"no messages queued or finished in the last {_fmt_span(retention)} (storage.finished_retention)")
            return EXIT_OK
        if args.action == "retry":
            if not args.all and not args.id:
                raise CLIError("give a queue ID or --all", EXIT_USAGE)
            n = await ops.retry(actor, None if args.all else args.id)
            emit(args, {"due_now": n}, f"{n} recipient(s) due now (a running relay picks them up within 2 s)")
            return EXIT_OK
        if args.action == "show":
            m = await q.record(args.id)
            if m is None:
                await ops.show_message(args.id)  # raises the not-found error
            lines = [f"id:        {m['id']}", f"sender:    <{m['sender']}>", f"created:   {_fmt_time(m['created_at'])}",
                     f"size:      {m['size']}", f"user:      {m['auth_user'] or '-'}", f"client:    {m['client_ip'] or '-'}",
                     f"dkim:      " + (f"signed for {m['dkim_domain']}" if m["dkim_signed"] else
                                       f"to be signed for {m['dkim_domain']}" if m["dkim_domain"] else "-"),
                     f"state:     {m['state']}"
                     + (f" (finished {_fmt_time(m['finished_at'])}; kept until "
                        f"{_fmt_time(m['finished_at'] + retention)}, headers only)" if m["finished_at"] else ""),
                     "", table(
                         [[r["rcpt"], r["state"] + (" (in flight)" if r["in_flight"] else ""), r["attempts"],
                           _fmt_time(r["next_attempt_at"]) if r["state"] in ("pending", "deferred") else "-",
                           r["last_error"] or "-"] for r in m["recipients"]],
                         ["RECIPIENT", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR"]),
                     "", "history:"] + [f"  {_fmt_time(h['ts'])}  {h['event']:<9} {h['rcpt'] or ''} {h['detail'] or ''}"
                                        + _fmt_attempt_tls(h) for h in m["history"]] + ["", "headers:", m["headers"]]
            emit(args, m, "\n".join(lines))
            return EXIT_OK
        if args.action == "delete":
            bounced = await ops.delete_message(actor, args.id, bounce=args.bounce)
            emit(args, {"deleted": args.id, "bounced": bounced},
                 f"deleted {args.id}" + (" and queued a bounce to the sender" if bounced else ""))
            return EXIT_OK
        raise CLIError(f"unknown queue action {args.action}", EXIT_USAGE)
    return _with_ops(cfg, run)


# ---------------------------------------------------------------- HTTP API keys

def cmd_admin_api_key(args: argparse.Namespace, cfg: Config) -> int:
    """relay admin api-key add/list/revoke: keys for the HTTP API (/api/v1/), made only here."""
    from .operations import Operations, as_dict
    actor = cli_actor()

    async def run(ops: Operations) -> int:
        if args.key_action == "add":
            info, token = await ops.add_api_key(actor, args.name, args.scope)
            emit(args, {**as_dict(info), "token": token},
                 f"added API key {info.id} ({info.scope}) {info.name}\ntoken: {token}\n"
                 "(shown once; send it as 'Authorization: Bearer <token>'; "
                 f"revoke with: {PROG} admin api-key revoke {info.id})")
        elif args.key_action == "list":
            keys = await ops.list_api_keys()
            emit(args, [as_dict(k) for k in keys], table(
                [[k.id, k.scope, "revoked " + _fmt_time(k.revoked_at) if k.revoked_at else "active",
                  _fmt_time(k.created_at), _fmt_time(k.last_used_at), k.name] for k in keys],
                ["ID", "SCOPE", "STATE", "CREATED", "LAST USED", "NAME"]) if keys
                 else f"no API keys; add one: {PROG} admin api-key add NAME --scope read")
        else:
            await ops.revoke_api_key(actor, args.key_id)
            emit(args, {"id": args.key_id, "revoked": True},
                 f"revoked API key {args.key_id}; requests with it get 401 from now on")
        return EXIT_OK

    # Like `domain add`: a key may be the first thing made on a new install.
    return _with_ops(cfg, run, create=args.key_action == "add")


def _add_admin_api_key_parser(admin_sub, common: argparse.ArgumentParser) -> None:
    k = admin_sub.add_parser("api-key", parents=[common], help="HTTP API keys: add, list, revoke")
    ksub = k.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    ka = ksub.add_parser("add", parents=[common], help="create an API key (the token is printed once)")
    ka.add_argument("name", metavar="NAME", help="what the key is for, e.g. deploy-bot")
    ka.add_argument("--scope", choices=("read", "write"), required=True,
                    help="read: GET only; write: also create, reset, delete, retry")
    ksub.add_parser("list", parents=[common], help="list API keys (never their tokens)")
    kr = ksub.add_parser("revoke", parents=[common], help="revoke an API key")
    kr.add_argument("key_id", metavar="ID")


def cmd_admin(args: argparse.Namespace, cfg: Config) -> int:
    if args.admin_action == "api-key":
        return cmd_admin_api_key(args, cfg)
    return cmd_admin_account(args, cfg)  # add, list, remove, passwd


def cmd_cert(args: argparse.Namespace, cfg: Config) -> int:
    from . import tls
    cert, key = Path(cfg.tls.cert), Path(cfg.tls.key)
    if (cert.exists() or key.exists()) and not args.force:
        raise CLIError(f"{cert} or {key} already exists; use --force to replace it")
    hostname = args.hostname or cfg.server.hostname
    try:
        # Certificates carry the ASCII (A-label) form of an IDN (RFC 5280 7.2).
        hostname = hostname.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        hostname = ""
    if not config_mod.is_hostname(hostname):
        raise CLIError(f"--hostname: expected a host name or IP address, got {args.hostname or cfg.server.hostname!r}",
                       EXIT_USAGE)
    default_dir = Path(config_mod.TLSConfig().cert).parent
    for name, p in (("tls.cert", cert), ("tls.key", key)):
        # Same rule as serve: a missing directory is a typo, not a place to create.
        if p.parent != default_dir and not p.parent.is_dir():
            raise CLIError(f"config error: {name}: directory {p.parent} does not exist (mistyped?)", EXIT_USAGE)
    if args.force:
        # An existing key file keeps its mode when rewritten in place (O_CREAT sets the mode
        # only for new files): remove it so the new key is created 0600.
        key.unlink(missing_ok=True)
    tls.write_self_signed(str(cert), str(key), hostname)
    emit(args, {"cert": str(cert), "key": str(key), "hostname": hostname},
         f"wrote self-signed certificate for {hostname}: {cert} (key {key}, mode 0600)\n"
         "clients will warn about it; install a real certificate (e.g. certbot) and send SIGHUP to reload")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    config_mod.check_files(cfg)
    warn(cfg)
    data = config_mod.masked(cfg)
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print("# configuration is valid; effective values (secrets masked):")
        print(config_mod.to_toml(data), end="")
    return EXIT_OK


def _status_data(cfg: Config, src: "config_mod.ConfigSource", **database: Any) -> dict[str, Any]:
    """What `status` says on either backend; `database` adds the backend's own keys."""
    return {"config": str(src.path.absolute()), "found_by": src.found_by, **database,
            "cwd": str(Path.cwd()), "hostname": cfg.server.hostname,
            "tls_cert": str(Path(cfg.tls.cert).absolute()), "tls_cert_exists": Path(cfg.tls.cert).exists(),
            "warnings": config_mod.dns_warnings(cfg)}


def _status_emit(args: argparse.Namespace, cfg: Config, data: dict[str, Any], database_lines: list[str],
                 counted: bool) -> int:
    """The human form of `status`: the config, the database lines, what it holds (when counted),
    then the host name, the certificate and the warnings."""
    lines = [f"config:    {data['config']} (found by {data['found_by']})", *database_lines]
    if counted:
        lines += [f"           {data['domains']} domain(s), {data['credentials']} credential(s), "
                  f"{data['queued_messages']} queued message(s), {data['finished_messages']} finished "
                  f"(kept {_fmt_span(cfg.storage.finished_retention)}), schema {data['schema_version']}"]
    lines += [f"hostname:  {cfg.server.hostname}",
              f"tls:       {data['tls_cert']}" + ("" if data["tls_cert_exists"] else
                                                  " (missing: serve writes a self-signed pair)")]
    lines += [f"warning:   {w}" for w in data["warnings"]]
    emit(args, data, "\n".join(lines))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """Which config and database this command uses, and what is in them. Creates nothing."""
    src: config_mod.ConfigSource = args.config_source
    if cfg.storage.backend == "postgres":
        return _status_postgres(args, cfg, src)
    dbp = Path(cfg.storage.path)
    data = _status_data(cfg, src, database=str(dbp.absolute()), database_exists=dbp.exists())
    if dbp.exists():
        # Read-only, and without migrating: status must change nothing, even on an old file.
        conn = sqlite3.connect(f"file:{dbp.absolute()}?mode=ro", uri=True, timeout=5.0)
        try:
            q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            data["schema_version"] = q("PRAGMA user_version")
            data["domains"] = q("SELECT COUNT(*) FROM domains")
            data["credentials"] = q("SELECT COUNT(*) FROM credentials")
            has_finished = any(r[1] == "finished_at" for r in conn.execute("PRAGMA table_info(messages)"))
            data["queued_messages"] = q("SELECT COUNT(*) FROM messages"
                                        + (" WHERE finished_at IS NULL" if has_finished else ""))
            data["finished_messages"] = q("SELECT COUNT(*) FROM messages WHERE finished_at IS NOT NULL") \
                if has_finished else 0
        except sqlite3.Error as exc:
            raise CLIError(f"database {dbp.absolute()}: {exc}") from None
        finally:
            conn.close()
    return _status_emit(args, cfg, data, [f"database:  {data['database']}" + (
        "" if dbp.exists() else f" (does not exist yet: `{PROG} serve` or `{PROG} domain add` creates it)")],
        counted=dbp.exists())


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    from . import logs
    from .daemon import serve
    from .server.listeners import ListenError
    from .tls import TLSError
    logs.setup(cfg.logging.format, cfg.logging.level)
    src: config_mod.ConfigSource = args.config_source
    try:
        return serve(cfg, str(src.path), found_by=src.found_by)
    except (ListenError, TLSError, ConfigError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    except KeyboardInterrupt:
        return EXIT_OK


# ---------------------------------------------------------------- admin accounts (web admin)

async def _with_admin_accounts(cfg: Config, fn, create: bool = False):
    from .store.factory import open_stores
    if not create:  # `admin add` is a first step of an install, like `domain add`
        require_database(cfg)
    stores = await open_stores(cfg, role="cli")
    try:
        accounts, _sessions, close = await stores.admin_stores()
        try:
            return await fn(accounts)
        finally:
            await close()
    finally:
        await stores.close()


def cmd_admin_account(args: argparse.Namespace, cfg: Config) -> int:
    """relay admin add/list/remove/passwd: the only way admin accounts are made (no default password)."""
    from .admin.accounts import AccountError, name_problem

    async def run(accounts) -> int:
        try:
            if args.admin_action == "list":
                users = await accounts.list()
                emit(args, [{"username": u.username, "created": u.created_at, "last_login": u.last_login_at,
                             "disabled": u.disabled} for u in users],
                     table([[u.username, _fmt_time(u.created_at), _fmt_time(u.last_login_at)] for u in users],
                           ["NAME", "CREATED", "LAST LOGIN"]) if users else
                     f"no admin accounts: `{PROG} admin add NAME` creates one")
            elif args.admin_action == "remove":
                await accounts.remove(args.name)
                print(f"admin {args.name} removed (and its sessions ended)")
            elif args.admin_action == "add":
                await accounts.add(args.name, password)
                print(f"admin {args.name} added; log in at the web admin ({cfg.admin.listen or 'admin.listen is off'})")
            else:
                revoked = await accounts.set_password(args.name, password)
                print(f"password of admin {args.name} changed; {revoked} session(s) ended")
        except AccountError as exc:
            raise CLIError(str(exc)) from None
        return EXIT_OK

    password = ""
    if args.admin_action in ("add", "passwd"):
        problem = name_problem(args.name)
        if problem:
            raise CLIError(problem, EXIT_USAGE)
        password, _ = read_password(args, args.name, cfg.credentials.min_password_length)
        problem = password_problem(args.name, password, cfg.credentials.min_password_length)
        if problem:
            raise CLIError(problem)
    return asyncio.run(_with_admin_accounts(cfg, run, create=args.admin_action == "add"))


def _add_admin_account_parsers(admin_sub, common: argparse.ArgumentParser) -> None:
    for name, help_ in (("add", "create a web admin account"), ("passwd", "set an admin's password (ends its sessions)")):
        a = admin_sub.add_parser(name, parents=[common], help=help_)
        a.add_argument("name", metavar="NAME")
        a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    admin_sub.add_parser("list", parents=[common], help="list web admin accounts")
    r = admin_sub.add_parser("remove", parents=[common], help="remove a web admin account (and its sessions)")
    r.add_argument("name", metavar="NAME")


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="config file (default: $RELAY_CONFIG, else ./config/relay.toml, else /etc/relay/relay.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="say which config file and database are used (on stderr)")

    p = _Parser(prog="relay", description="Self-hosted SMTP submission relay.", parents=[common])
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", parents=[common], help="run the relay")
    sub.add_parser("check-config", parents=[common], help="validate and print the effective configuration")
    sub.add_parser("status", parents=[common], help="which config and database are used, and what they hold")

    dom = sub.add_parser("domain", parents=[common], help="manage sending domains")
    dsub = dom.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = dsub.add_parser("add", parents=[common], help="add a sending domain (and its DKIM key)")
    a.add_argument("domain")
    a.add_argument("--dkim-algorithm", choices=("rsa", "ed25519"), help="default: domains.dkim_algorithm")
    a.add_argument("--selector", help="DKIM selector (default: domains.dkim_selector or date-based)")
    a.add_argument("--no-dkim", action="store_true", help="add no DKIM key (mail is signed elsewhere, or unsigned)")
    dsub.add_parser("list", parents=[common], help="list sending domains")
    r = dsub.add_parser("remove", parents=[common], help="remove a sending domain")
    r.add_argument("domain")
    r.add_argument("--force", action="store_true", help="also remove its credentials; ignore queued mail")
    dk = dsub.add_parser("dkim", parents=[common], help="DKIM keys: list, rotate, remove")
    dksub = dk.add_subparsers(dest="dkim_action", required=True, metavar="ACTION")
    dkl = dksub.add_parser("list", parents=[common], help="list a domain's DKIM keys")
    dkl.add_argument("domain")
    dkr = dksub.add_parser("rotate", parents=[common], help="new active key; the old one stays published")
    dkr.add_argument("domain")
    dkr.add_argument("--dkim-algorithm", choices=("rsa", "ed25519"))
    dkr.add_argument("--selector")
    dkd = dksub.add_parser("remove", parents=[common], help="remove a retired key")
    dkd.add_argument("domain")
    dkd.add_argument("selector_name", metavar="SELECTOR")
    dd = dsub.add_parser("dns", parents=[common], help="print the DNS records to publish")
    dd.add_argument("domain")
    dd.add_argument("--zone", action="store_true", help="zone-file snippet only")
    dv = dsub.add_parser("verify", parents=[common], help="look the records up; exit 0 when DKIM and SPF are right")
    dv.add_argument("domain")

    usr = sub.add_parser("user", parents=[common], help="manage SMTP credentials")
    usub = usr.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_ in (("add", "create a credential (USER@DOMAIN)"), ("reset-password", "set a new password")):
        u = usub.add_parser(name, parents=[common], help=help_)
        u.add_argument("username", metavar="USER@DOMAIN")
        g = u.add_mutually_exclusive_group()
        g.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        g.add_argument("--generate", action="store_true", help="generate a strong password and print it once")
    ul = usub.add_parser("list", parents=[common], help="list credentials")
    ul.add_argument("domain", nargs="?")
    ud = usub.add_parser("delete", parents=[common], help="delete a credential")
    ud.add_argument("username", metavar="USER@DOMAIN")

    nd = sub.add_parser("node", parents=[common], help="the relay nodes on this database")
    ndsub = nd.add_subparsers(dest="action", required=True, metavar="ACTION")
    ndsub.add_parser("list", parents=[common], help="nodes seen: state, last heartbeat, leases held")

    q = sub.add_parser("queue", parents=[common], help="inspect and manage the mail queue")
    qsub = q.add_subparsers(dest="action", required=True, metavar="ACTION")
    ql = qsub.add_parser("list", parents=[common], help="list queued messages")
    ql.add_argument("--all", action="store_true", help="also messages finished within storage.finished_retention")
    qsub.add_parser("history", parents=[common], help="recently finished messages and their outcome")
    qs = qsub.add_parser("show", parents=[common], help="show one message")
    qs.add_argument("id")
    qr = qsub.add_parser("retry", parents=[common], help="make a message (or all) due now")
    qr.add_argument("id", nargs="?")
    qr.add_argument("--all", action="store_true")
    qd = qsub.add_parser("delete", parents=[common], help="delete a message")
    qd.add_argument("id")
    qd.add_argument("--bounce", action="store_true", help="send the sender a failure report")

    c = sub.add_parser("cert", parents=[common], help="TLS certificate helpers")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cs = csub.add_parser("selfsigned", parents=[common], help="write a self-signed certificate to tls.cert/tls.key")
    cs.add_argument("--hostname", help="default: server.hostname")
    cs.add_argument("--force", action="store_true", help="replace existing files")

    adm = sub.add_parser("admin", parents=[common], help="web admin accounts and HTTP API keys")
    admin_sub = adm.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    _add_admin_account_parsers(admin_sub, common)
    _add_admin_api_key_parser(admin_sub, common)
    return p


def cmd_node(args: argparse.Namespace, cfg: Config) -> int:
    """relay node list: the nodes seen on this database (one on SQLite), from any node."""
    from .operations import Operations

    async def run(ops: Operations) -> int:
        rows = await ops.list_nodes()

        def ago(ts: float | None) -> str:
            return "-" if ts is None else f"{_fmt_age(ts)} ago"
        emit(args, rows, table([[r["node_id"], r["state"], r["hostname"] or "-", r["pid"] or "-", r["version"] or "-",
                                 _fmt_time(r["started_at"]), ago(r["heartbeat_at"]), r["leased"],
                                 _fmt_time(r["lease_until"]) if r["lease_until"] else "-"] for r in rows],
                               ["NODE", "STATE", "HOST", "PID", "VERSION", "STARTED", "HEARTBEAT", "LEASED",
                                "LEASES UNTIL"]) if rows else "no node has run on this database yet")
        return EXIT_OK

    return _with_ops(cfg, run)


COMMANDS = {"serve": cmd_serve, "check-config": cmd_check_config, "status": cmd_status, "domain": cmd_domain,
            "user": cmd_user, "queue": cmd_queue, "cert": cmd_cert, "admin": cmd_admin, "node": cmd_node}


def _status_postgres(args: argparse.Namespace, cfg: Config, src: "config_mod.ConfigSource") -> int:
    """`status` on PostgreSQL: read only, without migrating (as on SQLite), and the nodes seen."""
    import asyncpg

    st = cfg.storage
    data = _status_data(cfg, src, database=st.dsn, backend="postgres",
                        node_id=cfg.server.node_id or socket.gethostname())

    async def read() -> None:
        conn = await asyncpg.connect(st.dsn, password=st.resolved_password(), timeout=st.commit_timeout)
        try:
            q = conn.fetchval
            if await q("SELECT to_regclass('relay_schema')") is None:
                data["schema_version"] = 0
                return
            data["schema_version"] = await q("SELECT COALESCE(MAX(version), 0) FROM relay_schema")
            data["domains"] = await q("SELECT COUNT(*) FROM domains")
            data["credentials"] = await q("SELECT COUNT(*) FROM credentials")
            data["queued_messages"] = await q("SELECT COUNT(*) FROM messages WHERE finished_at IS NULL")
            data["finished_messages"] = await q("SELECT COUNT(*) FROM messages WHERE finished_at IS NOT NULL")
        finally:
            await conn.close()
    try:
        asyncio.run(read())
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CLIError(f"cannot read the PostgreSQL database {st.dsn} (storage.dsn): "
                       f"{type(exc).__name__}: {exc}") from None
    head = [f"database:  PostgreSQL {st.dsn}, node {data['node_id']}"]
    if not data["schema_version"]:
        head.append(f"           empty (no relay tables yet: `{PROG} serve` or `{PROG} domain add` creates them)")
    return _status_emit(args, cfg, data, head, counted=bool(data["schema_version"]))


def main(argv: Sequence[str] | None = None) -> int:
    global PROG, CONFIG_PATH
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    PROG = invoked_as(sys.argv[0], args.config)
    try:
        # One way to find the config (-c, $RELAY_CONFIG, ./config/relay.toml, /etc/relay/relay.toml);
        # with none, refuse: defaults would mean a new, empty database wherever we happen to be.
        src = config_mod.discover(args.config)
        CONFIG_PATH = str(src.path)
        cfg = config_mod.load(src.path)
        args.config_source = src
        if getattr(args, "verbose", False):
            from .store.factory import storage_identity
            print(f"relay: config {src.path.absolute()} (found by {src.found_by}); "
                  f"database {storage_identity(cfg)}", file=sys.stderr)
        return COMMANDS[args.command](args, cfg)
    except ConfigError as exc:
        print(f"relay: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:  # NotFound included
        print(f"relay: {hint(_one_line(exc))}", file=sys.stderr)
        return EXIT_REFUSED
    except CLIError as exc:
        print(f"relay: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    except sqlite3.Error as exc:  # e.g. locked beyond busy_timeout, disk full
        print(f"relay: database error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, RuntimeError) as exc:  # db.DatabaseError is a RuntimeError
        print(f"relay: {_one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("relay: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the promise is one line, never a traceback
        print(f"relay: unexpected error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


