"""Configuration: TOML -> frozen dataclasses, with every default defined once, here.

`load()` rejects unknown keys, wrong types and impossible values with a `ConfigError` that
names the key, so `relay` can print one line and exit 2. Durations are integer seconds and
sizes integer bytes: no unit parsing to get wrong.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import json
import math
import os
import re
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "config/relay.toml"
SYSTEM_CONFIG_PATH = "/etc/relay/relay.toml"
# Where a config is looked for when neither -c nor $RELAY_CONFIG names one, in order.
SEARCH_PATHS = (DEFAULT_CONFIG_PATH, SYSTEM_CONFIG_PATH)
TLS_MODES = ("starttls", "implicit")
SMARTHOST_TLS_MODES = ("starttls", "implicit", "none")
FROM_HEADER_MODES = ("domain", "off")
# Outbound TLS levels accepted in delivery.tls_policy (Postfix's names). "dane-only" (DANE
# required for that domain) needs dns.dnssec_resolver; plain "dane" is refused: DANE applies by
# itself wherever there are secure TLSA records.
TLS_POLICY_LEVELS = ("none", "may", "encrypt", "verify", "dane-only")


class ConfigError(Exception):
    """A bad configuration value; str() is the one line shown to the operator."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config error: {_with_block_number(key)}: {problem}")
        self.key = key
        self.problem = problem


class NoConfigFile(ConfigError):
    """No -c, no $RELAY_CONFIG and no file at any of SEARCH_PATHS: refuse rather than run on
    defaults, which would open (and create) a database nobody else uses."""

    def __init__(self, looked: list[str]):
        Exception.__init__(self, "no config file: looked for " + ", ".join(looked)
                           + "; name one with -c PATH or RELAY_CONFIG=PATH")
        self.key = "config"
        self.problem = str(self)
        self.looked = looked


_TABLE_ARRAYS = ("listeners", "trusted_networks")


def _with_block_number(key: str) -> str:
    # Keys index from 0 like the TOML arrays they name, but people count [[listeners]] blocks
    # in the file from 1: say which block, so 'listeners[2]' is not mistaken for the second.
    m = re.match(r"(\w+)\[(\d+)\]", key)
    if not m or m.group(1) not in _TABLE_ARRAYS:
        return key
    n = int(m.group(2)) + 1
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10 if n % 100 not in (11, 12, 13) else 0, "th")
    return f"{key} (the {n}{suffix} [[{m.group(1)}]] block)"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    # This node's name in queue leases ("" = the machine's host name). Recovery after a crash
    # takes back only this node's leases, so nodes sharing a store never take each other's work.
    node_id: str = ""
    # Grace period for open sessions on SIGTERM before they get 421.
    shutdown_grace: int = 30
    # SMTP sessions in this many worker processes (issue 16): the parent accepts and applies the
    # connection caps, each worker runs its sessions on its own core. 1: sessions in the parent
    # itself (one event loop); 0: one worker per core.
    acceptance_workers: int = 1
    # The event loop of `relay serve` and its children: "uvloop" (libuv, the loop's own work in
    # C) or "asyncio" (the standard library's). relay/event_loop.py.
    event_loop: str = "uvloop"


@dataclass(frozen=True)
class Listener:
    address: str = "0.0.0.0"
    port: int = 587
    tls: str = "starttls"
    # Behind a load balancer (HAProxy send-proxy / send-proxy-v2): every connection must start
    # with a PROXY protocol v1 or v2 header, from one of trusted_proxies (CIDRs, required then);
    # the address in it is the client for caps, AUTH lockouts, trusted_networks, Received: and logs.
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()


def _default_listeners() -> tuple[Listener, ...]:
    return (
        Listener(port=25, tls="starttls"),
        Listener(port=465, tls="implicit"),
        Listener(port=587, tls="starttls"),
        Listener(port=2525, tls="starttls"),
    )


@dataclass(frozen=True)
class TLSConfig:
    cert: str = "certs/relay.crt"
    key: str = "certs/relay.key"


STORAGE_BACKENDS = ("sqlite", "postgres")



@dataclass(frozen=True)
class StorageConfig:
    # "sqlite" (one node, the default) or "postgres" (one or many nodes sharing one database:
    # docs/multinode.md). Every process of a node (serve, delivery, CLI, web admin) opens the same.
    backend: str = "sqlite"
    path: str = "var/relay.db"
    # backend = "postgres": a libpq-style URL without a password, e.g.
    # "postgresql://relay@db.example.net:5432/relay?sslmode=verify-full". The password comes
    # from password_file (its first line) or the environment variable named by password_env.
    dsn: str = ""
    password_file: str = ""
    password_env: str = ""
    pool_size: int = 10
    # Seconds a PostgreSQL statement (and a COMMIT's synchronous-replication wait) may take
    # before the store gives up with StoreUnavailable (451 4.3.0 at the SMTP edge); below
    # the clients' DATA timeout.
    commit_timeout: float = 20.0
    # Seconds a finished message (delivered, bounced, failed) stays visible to `relay queue
    # history` and `queue show`, headers only; 0: purged at the next sweep (within a minute).
    finished_retention: int = 86400
    # Directory for message bodies too large to keep in the database (see limits.data_in_memory);
    # empty: "<path>.spool" beside the database file. Relay serve removes files no row refers to
    # at start (a crash between writing a body and committing its row).
    spool_dir: str = ""

    def resolved_spool_dir(self) -> str:
        return self.spool_dir or f"{self.path}.spool"

    def resolved_password(self) -> str | None:
        """The PostgreSQL password (never logged), or None to let libpq-style defaults apply
        (a .pgpass file, peer or certificate authentication)."""
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        if self.password_env:
            return os.environ.get(self.password_env)
        return None


@dataclass(frozen=True)
class SmarthostConfig:
    host: str = ""
    port: int = 587
    tls: str = "starttls"
    username: str = ""
    password: str = ""
    # Name of an environment variable holding the password (keeps it out of the file).
    password_env: str = ""
    verify_cert: bool = True

    def resolved_password(self) -> str:
        if self.password_env:
            return os.environ.get(self.password_env, "")
        return self.password


@dataclass(frozen=True)
class DeliveryConfig:
    mode: str = "mx"
    mx_port: int = 25
    # EHLO name for outbound sessions; empty means server.hostname.
    helo_hostname: str = ""
    # Verify the MX certificate and defer when TLS is unavailable, for all or listed domains
    # (the outbound TLS policy level "verify"; see tls_policy for per-domain levels).
    require_tls: bool = False
    require_tls_domains: tuple[str, ...] = ()
    # Per destination domain, a Postfix TLS level: none | may | encrypt | verify. It is the
    # operator's last word: over MTA-STS, require_tls and the downgrade memory.
    tls_policy: dict[str, str] = field(default_factory=dict)
    # Look up and apply MTA-STS policies (RFC 8461) of recipient domains.
    mta_sts: bool = True
    # DANE (RFC 7672) for recipient domains; only with dns.dnssec_resolver set.
    dane: bool = True
    # Remember per destination domain the best TLS seen (verified > encrypted > plain) and defer
    # rather than deliver below it (a STARTTLS-stripping attacker gets a deferral, not the mail).
    downgrade_protection: bool = True
    # A remembered level lapses when not seen again for this long (seconds).
    downgrade_memory: int = 90 * 86400
    # Extra CA certificates (PEM file) trusted besides the system store when verifying MX
    # certificates and MTA-STS policy hosts; empty: the system store only.
    tls_ca_file: str = ""
    # Port of the MTA-STS policy host: 443 as RFC 8461 3.3 says; another value is for tests.
    mta_sts_port: int = 443
    # TLSRPT (RFC 8460): send daily reports from this address (a sending domain's, so they are
    # DKIM-signed) to the rua of each policy domain; empty: sessions are counted, nothing is sent.
    tlsrpt_from: str = ""
    # organization-name in the reports; empty: server.hostname.
    tlsrpt_organization: str = ""
    max_connections: int = 50
    # On PostgreSQL a limit for all nodes together (shared slots: store/slots.py), not per node.
    max_connections_per_destination: int = 5
    # Messages carried by one outbound session before it is closed.
    max_messages_per_connection: int = 100
    connect_timeout: int = 30
    command_timeout: int = 120
    # Sending the body: no progress for this long aborts it (Postfix smtp_data_xfer_timeout).
    data_xfer_timeout: int = 180
    # The wait for the reply to the final dot (Postfix smtp_data_done_timeout).
    data_done_timeout: int = 600
    # One message's whole attempt (every MX, every command). It is also cut short when the
    # lease cannot be renewed, before the lease runs out: no attempt ever outlives its lease.
    attempt_timeout: int = 1200
    # Per attempt: addresses tried, and sessions that got past the greeting (Postfix
    # smtp_mx_address_limit, smtp_mx_session_limit).
    max_mx_addresses: int = 5
    max_mx_sessions: int = 2
    # A destination whose connections failed this many times in a row is suspended: its mail is
    # deferred without a connection for dead_destination_backoff seconds, then one probe goes.
    dead_destination_failures: int = 5
    dead_destination_backoff: int = 300
    # Delay before attempt n+1; the last value repeats.
    retry_schedule: tuple[int, ...] = (60, 300, 900, 1800, 3600, 7200)
    max_queue_lifetime: int = 5 * 86400
    # Send a delay warning to the sender once a message waits this long; 0 turns it off.
    delay_warning_after: int = 0
    # How long a claimed recipient stays invisible to other workers (crash recovery bound).
    lease_seconds: int = 600
    # Deliver from a second process, so acceptance and delivery each get a core.
    separate_process: bool = True
    smarthost: SmarthostConfig = field(default_factory=SmarthostConfig)


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    timeout: int = 10
    # A DNSSEC-validating resolver (unbound on loopback) for DANE (RFC 7672): the MX and TLSA
    # lookups of DANE go there and its AD bit is trusted. Loopback only (an AD bit that crossed
    # a network is worth nothing); empty = no DANE.
    dnssec_resolver: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = 26_214_400
    recipients: int = 100
    connections: int = 2000
    connections_per_ip: int = 20
    # TLS handshakes in progress at once (implicit TLS and STARTTLS together), and how long one
    # may take: connections are counted at accept, so silent ones cost a slot for this long.
    tls_handshakes: int = 100
    tls_handshake_timeout: int = 10
    # PROXY-protocol listeners: connections still reading their header at once (beyond: closed
    # at accept), and how long the header may take. Per-IP caps apply once the header names the client.
    proxy_headers: int = 100
    proxy_header_timeout: int = 10
    # Failed logins per (client network, username) in auth_failure_window, then that pair is
    # locked for auth_lockout; per network across usernames the budget is auth_failures_per_network.
    auth_failures: int = 5
    auth_failure_window: int = 300
    auth_lockout: int = 900
    auth_failures_per_network: int = 20
    # Per username across all networks, per auth_user_window: beyond it only networks where the
    # credential logged in before may try (familiar networks).
    auth_failures_per_user: int = 30
    auth_user_window: int = 3600
    # Client addresses are grouped into networks of these prefix lengths for the budgets above.
    auth_ipv4_prefix: int = 32
    auth_ipv6_prefix: int = 64
    # Password verifications (argon2) waiting or running at once; beyond: 454 4.7.0 at once.
    auth_pending: int = 16
    # Seconds before a 535 reply: slows guessing, same for unknown user and bad password.
    auth_failure_delay: float = 1.0
    # Idle time allowed between commands, and between DATA chunks (progress, not total).
    idle_timeout: int = 300
    session_timeout: int = 3600
    max_commands: int = 1000
    max_errors: int = 10
    max_received_headers: int = 50
    # DATA larger than this goes to a file in storage.spool_dir as it arrives (and is signed and
    # sent from there in chunks): no process holds more than this much of any one message.
    data_in_memory: int = 262_144
    # Bytes of DATA being received at once, all sessions together; past it, the session that
    # crosses it (and any DATA command meanwhile) gets 451 4.3.1 and the client tries again.
    max_data_in_flight: int = 1_073_741_824


@dataclass(frozen=True)
class CredentialsConfig:
    per_domain: int = 5
    min_password_length: int = 12
    argon2_time_cost: int = 3
    argon2_memory_cost: int = 65536
    argon2_parallelism: int = 4
    # Seconds a successful verification is remembered (bound to the stored hash).
    verify_cache_ttl: int = 300


@dataclass(frozen=True)
class TrustedNetwork:
    network: str = ""
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class RefusalConfig:
    address: str = "0.0.0.0"
    pop3_port: int = 110
    imap_port: int = 143
    pop3s_port: int = 995
    imaps_port: int = 993


@dataclass(frozen=True)
class DomainsConfig:
    """Sender authentication for sending domains: DKIM keys and the DNS records to publish."""
    dkim_algorithm: str = "rsa"
    dkim_rsa_bits: int = 2048
    # Empty: date-based, e.g. "relay20261126" (rotation makes a new one).
    dkim_selector: str = ""
    # This relay's public addresses, for the SPF record and the A/AAAA/PTR references.
    public_addresses: tuple[str, ...] = ()
    # SPF include: of the smarthost provider (when delivery.mode = "smarthost").
    spf_include: str = ""
    # Address for DMARC aggregate reports in the suggested record; empty: postmaster@DOMAIN.
    dmarc_rua: str = ""
    # Refuse mail from a domain until `relay domain verify` has found its records (550 5.7.1).
    require_verified: bool = False


@dataclass(frozen=True)
class PolicyConfig:
    """What an authenticated client may put in the message itself (the envelope rules are fixed)."""
    # "domain": every From: header address must be at the credential's domain or a subdomain
    # (550 5.7.1 otherwise; the message is signed with that domain's DKIM key). "off": any From:.
    from_header: str = "domain"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9469"


@dataclass(frozen=True)
class AdminConfig:
    """The web admin and HTTP API (`/api/v1/`), served on the relay's own event loop."""
    # host:port; "" turns the web admin and the API off. A non-loopback address needs
    # tls = true or allow_insecure_http = true.
    listen: str = "127.0.0.1:8025"
    tls: bool = False                      # serve HTTPS with the relay's tls.cert/tls.key
    allow_insecure_http: bool = False
    public_origin: str = ""                # e.g. "https://relay.example.com:8025" (CSRF Origin check)
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    session_idle_timeout: int = 1800
    session_absolute_timeout: int = 43200
    login_failures: int = 5                # per (IP, username) within login_failure_window
    login_failure_window: int = 900
    login_lockout: int = 900


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "logfmt"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: tuple[Listener, ...] = field(default_factory=_default_listeners)
    tls: TLSConfig = field(default_factory=TLSConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    trusted_networks: tuple[TrustedNetwork, ...] = ()
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    refusal: RefusalConfig = field(default_factory=RefusalConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def helo_hostname(self) -> str:
        return self.delivery.helo_hostname or self.server.hostname


# ---------------------------------------------------------------- generic loader

def _convert(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a table")
        return _build(tp, value, key)
    if origin is dict:
        (key_tp, value_tp) = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a table")
        return {k: _convert(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            if dataclasses.is_dataclass(item_tp) and isinstance(value, dict):
                # The usual slip: [listeners] instead of [[listeners]].
                raise ConfigError(key, f"expected an array of tables: write [[{key}]], not [{key}]")
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        # TOML has nan and inf; no duration or limit means anything with them.
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            raise ConfigError(key, "unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kwargs[k] = _convert(key, v, hints[k])
    return cls(**kwargs)


# ---------------------------------------------------------------- semantic checks

def _check_port(key: str, port: int, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not lo <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range {lo}-65535")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _port_number(text: str) -> int:
    # Digits only: int() would also take " 53", "+53" and "5_3".
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"bad port {text!r}")
    return int(text)


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address -> (host, port); ValueError otherwise.

    The port is not range-checked here: callers report that against their own key.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"unbalanced brackets in {text!r}")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        return host, _port_number(rest[1:])
    if text.count(":") == 1:
        host, _, port_s = text.partition(":")
        return host, _port_number(port_s)
    if ":" in text:
        ipaddress.IPv6Address(text)  # a bare IPv6 address, or nothing we understand (ValueError)
    return text, default_port


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def is_hostname(text: str) -> bool:
    """An ASCII DNS host name (RFC 5321 4.1.2 sub-domain syntax) or an IP address."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return len(text) <= 253 and _HOSTNAME_RE.fullmatch(text) is not None


def _ascii_domain(key: str, domain: str) -> str:
    """Lower-case IDNA form, as stored for sending domains and used for routes: a domain
    written 'MG.Example.com' or in Unicode must still match what we compare it with."""
    try:
        d = domain.rstrip(".").lower().encode("idna").decode("ascii")
    except UnicodeError:
        d = ""
    if "." not in d or not _HOSTNAME_RE.fullmatch(d) or d.replace(".", "").isdigit():
        raise ConfigError(key, f"expected a domain name like mg.example.com, got {domain!r}")
    return d


def _normalize(cfg: Config) -> Config:
    d = cfg.delivery
    if d.require_tls_domains:
        d = dataclasses.replace(d, require_tls_domains=tuple(
            _ascii_domain(f"delivery.require_tls_domains[{i}]", x) for i, x in enumerate(d.require_tls_domains)))
    if d.tls_policy:
        levels: dict[str, str] = {}
        for k, v in d.tls_policy.items():
            levels[_ascii_domain(f"delivery.tls_policy.{k}", k)] = v.strip().lower()
        d = dataclasses.replace(d, tls_policy=levels)
    nets = tuple(dataclasses.replace(tn, domains=tuple(
        _ascii_domain(f"trusted_networks[{i}].domains[{j}]", x) for j, x in enumerate(tn.domains)))
        for i, tn in enumerate(cfg.trusted_networks))
    return dataclasses.replace(cfg, delivery=d, trusted_networks=nets)


def _validate_storage(st: StorageConfig) -> None:
    if st.backend not in STORAGE_BACKENDS:
        raise ConfigError("storage.backend", f"must be one of {', '.join(STORAGE_BACKENDS)}, got {st.backend!r}")
    if st.backend == "sqlite":
        for key in ("dsn", "password_file", "password_env"):
            if getattr(st, key):
                raise ConfigError(f"storage.{key}", "only used with storage.backend = 'postgres'")
        return
    check_postgres_dsn(st)


def check_postgres_dsn(st: StorageConfig) -> None:
    """storage.dsn and where its password comes from; ConfigError with one line otherwise.
    The messages never repeat a password."""
    _check_positive("storage.pool_size", st.pool_size)
    _check_positive("storage.commit_timeout", st.commit_timeout)
    if not st.dsn:
        raise ConfigError("storage.dsn", "required with storage.backend = 'postgres', "
                          "e.g. 'postgresql://relay@db.example.net/relay'")
    try:
        url = urllib.parse.urlsplit(st.dsn)
        # libpq-style failover lists several hosts: "relay@db1:5432,db2:5432" (with
        # target_session_attrs=read-write the driver connects to whichever is the primary).
        for host in url.netloc.rpartition("@")[2].split(","):
            urllib.parse.urlsplit("//" + host).port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError("storage.dsn", "not a postgresql:// URL") from None
    if url.scheme not in ("postgresql", "postgres"):
        raise ConfigError("storage.dsn", f"must start with postgresql://, got {url.scheme or 'no scheme'}")
    inline = url.password is not None or any(
        k.lower() == "password" for k, _ in urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    if inline:
        raise ConfigError("storage.dsn", "has a password in it: put the password in a file only relay can read "
                          "and name it in storage.password_file, or in an environment variable named by "
                          "storage.password_env")
    if st.password_file and st.password_env:
        raise ConfigError("storage.password_env", "set storage.password_file or storage.password_env, not both")
    if st.password_file:
        try:
            with open(st.password_file, encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError("storage.password_file", f"cannot read {st.password_file}: {exc.strerror}") from None
    if st.password_env and st.password_env not in os.environ:
        raise ConfigError("storage.password_env", f"the environment variable {st.password_env} is not set")


def _validate(cfg: Config) -> None:
    # It goes into the banner, EHLO, Received: and the self-signed certificate: ASCII only.
    if not is_hostname(cfg.server.hostname):
        raise ConfigError("server.hostname", "expected a DNS host name (letters, digits, '-' and '.'; "
                          f"xn-- form for IDNs), got {cfg.server.hostname!r}")
    if not cfg.listeners:
        raise ConfigError("listeners", "at least one listener is required")
    seen = set()
    for i, lst in enumerate(cfg.listeners):
        _check_port(f"listeners[{i}].port", lst.port, allow_zero=True)
        if lst.tls not in TLS_MODES:
            raise ConfigError(f"listeners[{i}].tls", f"must be one of {', '.join(TLS_MODES)}, got {lst.tls!r}")
        if (lst.address, lst.port) in seen and lst.port != 0:
            raise ConfigError(f"listeners[{i}].port", f"{lst.address}:{lst.port} is listed twice")
        seen.add((lst.address, lst.port))
        if lst.proxy_protocol and not lst.trusted_proxies:
            raise ConfigError(f"listeners[{i}].trusted_proxies",
                              "required with proxy_protocol = true: the load balancers' addresses (CIDRs) "
                              "whose PROXY headers are believed")
        if lst.trusted_proxies and not lst.proxy_protocol:
            raise ConfigError(f"listeners[{i}].trusted_proxies", "only means something with proxy_protocol = true")
        for j, net in enumerate(lst.trusted_proxies):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"listeners[{i}].trusted_proxies[{j}]", f"not a CIDR network: {net!r}") from None
    d = cfg.delivery
    if d.mode not in ("mx", "smarthost"):
        raise ConfigError("delivery.mode", f"must be 'mx' or 'smarthost', got {d.mode!r}")
    _check_port("delivery.mx_port", d.mx_port)
    if d.helo_hostname and not is_hostname(d.helo_hostname):
        raise ConfigError("delivery.helo_hostname", f"expected a DNS host name or empty, got {d.helo_hostname!r}")
    if d.mode == "smarthost" and not d.smarthost.host:
        raise ConfigError("delivery.smarthost.host", "required when delivery.mode = 'smarthost'")
    _check_port("delivery.smarthost.port", d.smarthost.port)
    if d.smarthost.tls not in SMARTHOST_TLS_MODES:
        raise ConfigError("delivery.smarthost.tls",
                          f"must be one of {', '.join(SMARTHOST_TLS_MODES)}, got {d.smarthost.tls!r}")
    if d.smarthost.username and d.smarthost.tls == "none":
        raise ConfigError("delivery.smarthost.tls", "'none' would send the smarthost password in clear text")
    for k, v in d.tls_policy.items():
        if v == "dane":
            raise ConfigError(f"delivery.tls_policy.{k}", f"{v!r}: not a per-domain level; DANE applies by "
                              "itself to every domain with secure TLSA records once dns.dnssec_resolver is "
                              f"set; use one of {', '.join(TLS_POLICY_LEVELS)}")
        if v == "dane-only" and not (cfg.dns.dnssec_resolver and d.dane):
            raise ConfigError(f"delivery.tls_policy.{k}", "'dane-only' needs DANE: set dns.dnssec_resolver "
                              "(a validating resolver on loopback) and keep delivery.dane = true")
        if v not in TLS_POLICY_LEVELS:
            raise ConfigError(f"delivery.tls_policy.{k}",
                              f"must be one of {', '.join(TLS_POLICY_LEVELS)}, got {v!r}")
    _check_port("delivery.mta_sts_port", d.mta_sts_port)
    if d.tlsrpt_from and (d.tlsrpt_from.count("@") != 1 or not is_hostname(d.tlsrpt_from.rpartition("@")[2])
                          or not d.tlsrpt_from.isascii() or " " in d.tlsrpt_from):
        raise ConfigError("delivery.tlsrpt_from", f"expected an address like tlsrpt@example.com, got {d.tlsrpt_from!r}")
    _check_positive("delivery.downgrade_memory", d.downgrade_memory)
    if not d.retry_schedule:
        raise ConfigError("delivery.retry_schedule", "needs at least one delay")
    for i, s in enumerate(d.retry_schedule):
        _check_positive(f"delivery.retry_schedule[{i}]", s)
    for name in ("max_connections", "max_connections_per_destination", "max_messages_per_connection",
                 "connect_timeout", "command_timeout", "max_queue_lifetime", "lease_seconds",
                 "data_xfer_timeout", "data_done_timeout", "attempt_timeout", "max_mx_addresses",
                 "max_mx_sessions", "dead_destination_failures", "dead_destination_backoff"):
        _check_positive(f"delivery.{name}", getattr(d, name))
    _check_positive("delivery.delay_warning_after", d.delay_warning_after, allow_zero=True)
    if cfg.server.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError("server.event_loop", f"{cfg.server.event_loop!r}: must be 'uvloop' or 'asyncio'")
    if cfg.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("server.event_loop", "'uvloop' is not installed here (pip install uvloop), or set 'asyncio'")
    _check_positive("server.acceptance_workers", cfg.server.acceptance_workers, allow_zero=True)
    if cfg.server.acceptance_workers > 64:
        raise ConfigError("server.acceptance_workers", f"at most 64 (0 = one per core), got {cfg.server.acceptance_workers}")
    _check_positive("limits.data_in_memory", cfg.limits.data_in_memory)
    _check_positive("limits.max_data_in_flight", cfg.limits.max_data_in_flight)
    _check_positive("storage.finished_retention", cfg.storage.finished_retention, allow_zero=True)
    _validate_storage(cfg.storage)
    for i, ns in enumerate(cfg.dns.nameservers):
        try:
            host, port = parse_hostport(ns, 53)
            ipaddress.ip_address(host)
            _check_port(f"dns.nameservers[{i}]", port)
        except ValueError:
            raise ConfigError(f"dns.nameservers[{i}]", f"expected an IP address with optional :port, got {ns!r}") from None
    _check_positive("dns.timeout", cfg.dns.timeout)
    if cfg.dns.dnssec_resolver:
        try:
            host, port = parse_hostport(cfg.dns.dnssec_resolver, 53)
            ip = ipaddress.ip_address(host)
            _check_port("dns.dnssec_resolver", port)
        except ValueError:
            raise ConfigError("dns.dnssec_resolver", "expected a loopback IP address with optional :port, "
                              f"got {cfg.dns.dnssec_resolver!r}") from None
        if not ip.is_loopback:
            raise ConfigError("dns.dnssec_resolver", f"{host} is not a loopback address: the AD bit is only "
                              "trusted from a validating resolver on this host (run unbound on 127.0.0.1)")
    for f in dataclasses.fields(LimitsConfig):
        _check_positive(f"limits.{f.name}", getattr(cfg.limits, f.name), allow_zero=(f.name == "auth_failure_delay"))
    for name, top in (("auth_ipv4_prefix", 32), ("auth_ipv6_prefix", 128)):
        if not 8 <= getattr(cfg.limits, name) <= top:
            raise ConfigError(f"limits.{name}", f"must be a prefix length from 8 to {top}, got {getattr(cfg.limits, name)}")
    c = cfg.credentials
    for f in dataclasses.fields(CredentialsConfig):
        _check_positive(f"credentials.{f.name}", getattr(c, f.name))
    if c.argon2_memory_cost < 8 * c.argon2_parallelism:
        raise ConfigError("credentials.argon2_memory_cost", "must be at least 8 x argon2_parallelism (KiB)")
    for i, tn in enumerate(cfg.trusted_networks):
        try:
            ipaddress.ip_network(tn.network, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_networks[{i}].network", f"not a CIDR network: {tn.network!r}") from None
        if not tn.domains:
            raise ConfigError(f"trusted_networks[{i}].domains", "list the sending domains this network may use")
    dm = cfg.domains
    if dm.dkim_algorithm not in ("rsa", "ed25519"):
        raise ConfigError("domains.dkim_algorithm", f"must be 'rsa' or 'ed25519', got {dm.dkim_algorithm!r}")
    if dm.dkim_rsa_bits not in (1024, 2048, 3072, 4096):
        raise ConfigError("domains.dkim_rsa_bits", f"must be 1024, 2048, 3072 or 4096, got {dm.dkim_rsa_bits}")
    if dm.dkim_selector and not all(c.isalnum() or c in "-." for c in dm.dkim_selector):
        raise ConfigError("domains.dkim_selector", f"letters, digits, '-' and '.' only, got {dm.dkim_selector!r}")
    for i, a in enumerate(dm.public_addresses):
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ConfigError(f"domains.public_addresses[{i}]", f"not an IP address: {a!r}") from None
    if cfg.policy.from_header not in FROM_HEADER_MODES:
        raise ConfigError("policy.from_header",
                          f"must be one of {', '.join(FROM_HEADER_MODES)}, got {cfg.policy.from_header!r}")
    r = cfg.refusal
    for name in ("pop3_port", "imap_port", "pop3s_port", "imaps_port"):
        _check_port(f"refusal.{name}", getattr(r, name), allow_zero=True)
    try:
        host, port = parse_hostport(cfg.metrics.listen, 9469)
    except ValueError:
        host, port = "", 0
    # An empty host would bind every interface: make the operator write 0.0.0.0 for that.
    if not host or not is_hostname(host):
        raise ConfigError("metrics.listen", f"expected host:port like 127.0.0.1:9469, got {cfg.metrics.listen!r}")
    _check_port("metrics.listen", port, allow_zero=True)
    _check_admin(cfg.admin)
    if cfg.logging.format not in ("logfmt", "json"):
        raise ConfigError("logging.format", f"must be 'logfmt' or 'json', got {cfg.logging.format!r}")
    if cfg.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("logging.level", f"must be debug, info, warning or error, got {cfg.logging.level!r}")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_admin(a: "AdminConfig") -> None:
    """[admin]: a usable host:port (or "" = off); nothing beyond loopback in plain HTTP unless
    the operator says so (session cookies and passwords would cross the network in clear)."""
    if a.listen != "":
        try:
            host, port = parse_hostport(a.listen, -1)  # the port must be written
        except ValueError:
            host, port = "", -1
        if not host or not is_hostname(host) or not 0 <= port <= 65535:
            raise ConfigError("admin.listen", f"expected host:port like 127.0.0.1:8025 (or \"\" for off), "
                              f"got {a.listen!r}")
        if not _is_loopback(host) and not a.tls and not a.allow_insecure_http:
            raise ConfigError("admin.listen", f"{host} is not a loopback address: set admin.tls = true, or "
                              "admin.allow_insecure_http = true behind a TLS proxy or on a trusted network")
    if a.public_origin:
        scheme, sep, rest = a.public_origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise ConfigError("admin.public_origin", f"expected scheme://host[:port] like "
                              f"https://relay.example.com:8025, got {a.public_origin!r}")
    for i, net in enumerate(a.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"admin.trusted_proxies[{i}]", f"not a CIDR network: {net!r}") from None
    for name in ("session_idle_timeout", "session_absolute_timeout", "login_failures", "login_failure_window",
                 "login_lockout"):
        _check_positive(f"admin.{name}", getattr(a, name))


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _normalize(_build(Config, data))
    _validate(cfg)
    return cfg


@dataclass(frozen=True)
class ConfigSource:
    """Which config file a command uses, and what found it (said out loud by --verbose/status)."""
    path: Path
    found_by: str          # "-c", "RELAY_CONFIG" or the search path that matched


def discover(path: str | os.PathLike[str] | None = None,
             search: tuple[str, ...] = SEARCH_PATHS) -> ConfigSource:
    """-c, then $RELAY_CONFIG, then each of `search` (relative ones from the current directory).

    A named file is returned even if missing (load() then says so); when nothing is named and
    nothing is found, NoConfigFile lists every place looked at.
    """
    if path is not None:
        return ConfigSource(Path(path), "-c")
    env = os.environ.get("RELAY_CONFIG") or None  # set but empty counts as unset
    if env is not None:
        return ConfigSource(Path(env), "RELAY_CONFIG")
    shown = [c if os.path.isabs(c) else "./" + c for c in search]
    for candidate, name in zip(search, shown):
        if Path(candidate).exists():
            return ConfigSource(Path(candidate), name)
    looked = ["-c (not given)", "$RELAY_CONFIG (unset)"]
    looked += [name if os.path.isabs(c) else f"{name} (in {Path.cwd()})" for c, name in zip(search, shown)]
    raise NoConfigFile(looked)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config `discover(path)` finds; no file at all is an error too."""
    p = discover(path).path
    if not p.exists():
        raise ConfigError(str(p), "config file not found")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        # tomllib decodes before parsing and lets this through (TOML files are UTF-8).
        raise ConfigError(str(p), f"invalid TOML: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read: {exc.strerror}") from None
    return from_dict(data)


def check_files(cfg: Config) -> None:
    """Certificate files: both present, or both absent in an existing directory (then serve
    writes a self-signed pair there). A missing directory is a typo until proven otherwise:
    filling it with a self-signed pair would serve that to every client without a word."""
    cert, key = Path(cfg.tls.cert), Path(cfg.tls.key)
    if cert.exists() != key.exists():
        missing = "tls.key" if cert.exists() else "tls.cert"
        raise ConfigError(missing, f"file {cfg.tls.key if cert.exists() else cfg.tls.cert} not found "
                          "(the other one of the pair exists)")
    if not cert.exists():
        # The default certs/ may be created (a fresh install run from elsewhere has none).
        default_dir = Path(TLSConfig().cert).parent
        for key_name, p in (("tls.cert", cert), ("tls.key", key)):
            if p.parent != default_dir and not p.parent.is_dir():
                raise ConfigError(key_name, f"file {p} not found and its directory {p.parent} does not exist "
                                  "(mistyped?); a self-signed pair is written only into an existing directory")
    for key_name, p in (("tls.cert", cert), ("tls.key", key)):
        if p.exists() and not os.access(p, os.R_OK):
            raise ConfigError(key_name, f"file {p} is not readable by this user")


def is_public_name(hostname: str) -> bool:
    """A fully qualified name other receivers can look up: not localhost, not one label, not an IP."""
    h = hostname.rstrip(".").lower()
    try:
        ipaddress.ip_address(h)
        return False
    except ValueError:
        pass
    return "." in h and h != "localhost" and not h.endswith((".localhost", ".localdomain", ".local"))


def spf_relies_on_hostname(cfg: Config) -> bool:
    """The suggested SPF record would be 'a:server.hostname' (no public_addresses, no include)."""
    d = cfg.domains
    return not d.public_addresses and not (cfg.delivery.mode == "smarthost" and d.spf_include)


def dns_warnings(cfg: Config) -> list[str]:
    """One line per DNS-facing setting still at a value receivers cannot use."""
    if is_public_name(cfg.server.hostname):
        return []
    out = [f"server.hostname is {cfg.server.hostname!r}, not this host's public name (FQDN): receivers see it "
           "in EHLO and Received:, and the self-signed certificate carries it; set it to e.g. mail.example.com"]
    if spf_relies_on_hostname(cfg):
        what = "domains.spf_include (the smarthost's SPF include)" if cfg.delivery.mode == "smarthost" \
            else "domains.public_addresses (this relay's public IP addresses)"
        out.append(f"the SPF record would rely on server.hostname ('a:{cfg.server.hostname}'), which cannot "
                   f"work: set {what}")
    return out


def masked(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets replaced by '***'."""
    data = dataclasses.asdict(cfg)
    if data["delivery"]["smarthost"]["password"]:
        data["delivery"]["smarthost"]["password"] = "***"
    return data


def to_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for check-config output (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []

    def _key(k: str) -> str:
        # A domain as a key ("example.com") must be quoted, or TOML reads it as nested tables.
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")

    def table(prefix: str, d: dict[str, Any], header: str | None) -> None:
        if header:
            lines.append(header)
        subs = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append((k, v))
            elif isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
                subs.append((k, v))
            else:
                lines.append(f"{_key(k)} = {scalar(v)}")
        for k, v in subs:
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            if isinstance(v, dict):
                lines.append("")
                table(name, v, f"[{name}]")
            else:
                for item in v:
                    lines.append("")
                    table(name, item, f"[[{name}]]")

    table("", data, None)
    return "\n".join(lines).lstrip("\n") + "\n"

