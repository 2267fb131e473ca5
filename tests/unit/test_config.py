"""relay.config: defaults, the shipped config/relay.toml, and one clear error per bad value.

Every refusal names the exact key (dotted, with [i] for arrays) so `relay` can print
`config error: KEY: PROBLEM` on one line and exit 2.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path

import pytest

from relay import config
from relay.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "relay.toml"


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch):
    # A developer's RELAY_CONFIG must not leak into these tests.
    monkeypatch.delenv("RELAY_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------ defaults and the shipped file

def test_no_file_anywhere_is_refused_and_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/relay.toml here
    with pytest.raises(config.NoConfigFile) as info:
        config.discover(None, search=(config.DEFAULT_CONFIG_PATH, str(tmp_path / "etc" / "relay.toml")))
    text = str(info.value)
    assert "-c (not given)" in text and "$RELAY_CONFIG (unset)" in text
    assert f"./config/relay.toml (in {tmp_path})" in text and str(tmp_path / "etc" / "relay.toml") in text
    assert "\n" not in text


def test_discovery_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    system = write(tmp_path, "", "system.toml")
    search = (config.DEFAULT_CONFIG_PATH, str(system))
    assert config.discover(None, search) == config.ConfigSource(system, str(system))
    (tmp_path / "config").mkdir()
    local = write(tmp_path / "config", "")
    assert config.discover(None, search) == config.ConfigSource(Path("config/relay.toml"), "./config/relay.toml")
    monkeypatch.setenv("RELAY_CONFIG", str(tmp_path / "env.toml"))  # named: returned even if missing
    assert config.discover(None, search) == config.ConfigSource(tmp_path / "env.toml", "RELAY_CONFIG")
    assert config.discover(local, search) == config.ConfigSource(local, "-c")


def test_defaults_are_the_empty_file():
    cfg = config.from_dict({})
    assert cfg == Config()
    assert cfg.credentials.per_domain == 5
    assert cfg.credentials.min_password_length == 12
    assert [(lst.port, lst.tls) for lst in cfg.listeners] == [
        (25, "starttls"), (465, "implicit"), (587, "starttls"), (2525, "starttls")]
    assert cfg.helo_hostname == cfg.server.hostname  # empty delivery.helo_hostname falls back


def test_default_path_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "[limits]\nrecipients = 7\n")
    assert config.load().limits.recipients == 7


def test_config_is_frozen():
    cfg = config.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limits.recipients = 1  # type: ignore[misc]


def test_shipped_file_equals_code_defaults():
    assert config.load(SHIPPED) == config.from_dict({})


def _walk_missing(cls: type, data: dict, prefix: str, defaults: dict) -> list[str]:
    """Dataclass fields absent from `data`, and values that differ from the code default."""
    problems = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if f.name not in data:
            problems.append(f"{key}: missing")
            continue
        if dataclasses.is_dataclass(tp):
            problems += _walk_missing(tp, data[f.name], key, defaults[f.name])
        elif item is not None and dataclasses.is_dataclass(item):
            for i, (sub, sub_default) in enumerate(zip(data[f.name], defaults[f.name], strict=True)):
                problems += _walk_missing(item, sub, f"{key}[{i}]", sub_default)
        elif data[f.name] != defaults[f.name] and list(data[f.name]) != defaults[f.name]:
            problems.append(f"{key}: file has {data[f.name]!r}, code default is {defaults[f.name]!r}")
    return problems


def test_every_field_appears_in_shipped_file_with_its_default():
    text = SHIPPED.read_text()
    data = tomllib.loads(text)
    defaults = json.loads(json.dumps(dataclasses.asdict(Config())))  # tuples -> lists
    # trusted_networks is off by default: the file documents it as a commented-out example.
    assert defaults["trusted_networks"] == [] and "trusted_networks" not in data
    data["trusted_networks"] = []
    # The PROXY-protocol keys are off by default and shown in a commented-out listener block.
    proxy_keys = {"proxy_protocol": False, "trusted_proxies": []}
    for lst in data["listeners"]:
        assert not proxy_keys.keys() & lst.keys()
        lst.update(proxy_keys)
    assert _walk_missing(Config, data, "", defaults) == []
    for key in proxy_keys:
        assert f"# {key} = " in text, f"listeners.{key} is not documented"
    for f in dataclasses.fields(config.TrustedNetwork):
        assert f"# {f.name} = " in text, f"trusted_networks.{f.name} is not documented"
    assert "# [[trusted_networks]]" in text


# ------------------------------------------------------------------ refusals: one key, one problem

BAD = [
    # unknown keys, top level and nested (with a suggestion for a near miss)
    ("frobnicate = 1", "frobnicate", "unknown key"),
    ("[limit]\nrecipients = 5", "limit", "unknown key (did you mean 'limits'?)"),
    ("[limits]\nrecipients_max = 5", "limits.recipients_max", "unknown key"),
    ("[delivery.smarthost]\nhots = 'x'", "delivery.smarthost.hots", "did you mean 'host'?"),
    ("[[listeners]]\nport = 587\ntsl = 'starttls'", "listeners[0].tsl", "did you mean 'tls'?"),
    ("[[trusted_networks]]\nnetwork = '10.0.0.0/8'\ndomain = ['a.example']", "trusted_networks[0].domain",
     "unknown key"),
    # wrong types
    ("[limits]\nrecipients = 'x'", "limits.recipients", "expected an integer, got 'x'"),
    ("[limits]\nrecipients = true", "limits.recipients", "expected an integer, got True"),
    ("[limits]\nrecipients = 1.5", "limits.recipients", "expected an integer, got 1.5"),
    ("[listeners]\nport = 25", "listeners", "write [[listeners]], not [listeners]"),
    ("[[listeners]]\nport = '587'", "listeners[0].port", "expected an integer, got '587'"),
    ("[delivery]\nrequire_tls = 1", "delivery.require_tls", "expected true or false, got 1"),
    ("[server]\nhostname = 5", "server.hostname", "expected a string, got 5"),
    ("[dns]\nnameservers = '127.0.0.1'", "dns.nameservers", "expected a list, got '127.0.0.1'"),
    ("limits = 5", "limits", "expected a table"),
    ("[delivery]\nretry_schedule = [60, 'x']", "delivery.retry_schedule[1]", "expected an integer, got 'x'"),
    ("[limits]\nauth_failure_delay = 'slow'", "limits.auth_failure_delay", "expected a number, got 'slow'"),
    ("[limits]\nauth_failure_delay = nan", "limits.auth_failure_delay", "expected a finite number"),
    ("[limits]\nauth_failure_delay = inf", "limits.auth_failure_delay", "expected a finite number"),
    # ports: 0 only where it means "ephemeral" or "off"
    ("[delivery]\nmx_port = 0", "delivery.mx_port", "port 0 out of range 1-65535"),
    ("[delivery]\nmx_port = 70000", "delivery.mx_port", "port 70000 out of range 1-65535"),
    ("[delivery.smarthost]\nport = 0", "delivery.smarthost.port", "port 0 out of range 1-65535"),
    ("[[listeners]]\nport = 70000", "listeners[0].port", "port 70000 out of range 0-65535"),
    ("[[listeners]]\nport = -1", "listeners[0].port", "out of range"),
    ("[refusal]\npop3_port = 70000", "refusal.pop3_port", "port 70000 out of range 0-65535"),
    ("[[listeners]]\nport = 587\n[[listeners]]\nport = 587", "listeners[1].port", "0.0.0.0:587 is listed twice"),
    ("listeners = []", "listeners", "at least one listener"),
    # enums
    ("[[listeners]]\nport = 465\ntls = 'ssl'", "listeners[0].tls", "must be one of starttls, implicit, got 'ssl'"),
    ("[[listeners]]\nport = 587\nproxy_protocol = true", "listeners[0].trusted_proxies",
     "required with proxy_protocol = true"),
    ("[[listeners]]\nport = 587\nproxy_protocol = true\ntrusted_proxies = []", "listeners[0].trusted_proxies",
     "required with proxy_protocol = true"),
    ("[[listeners]]\nport = 587\ntrusted_proxies = ['10.0.0.5/32']", "listeners[0].trusted_proxies",
     "only means something with proxy_protocol = true"),
    ("[[listeners]]\nport = 587\nproxy_protocol = true\ntrusted_proxies = ['10.0.0.5/33']",
     "listeners[0].trusted_proxies[0]", "not a CIDR network"),
    ("[[listeners]]\nport = 587\nproxy_protocol = 'yes'\ntrusted_proxies = ['10.0.0.5']",
     "listeners[0].proxy_protocol", "expected"),
    ("[limits]\nproxy_header_timeout = 0", "limits.proxy_header_timeout", "must be > 0"),
    ("[limits]\nproxy_headers = 0", "limits.proxy_headers", "must be > 0"),
    ("[delivery]\nmode = 'foo'", "delivery.mode", "must be 'mx' or 'smarthost', got 'foo'"),
    ("[delivery.smarthost]\ntls = 'ssl'", "delivery.smarthost.tls", "starttls, implicit, none, got 'ssl'"),
    ("[logging]\nlevel = 'verbose'", "logging.level", "got 'verbose'"),
    ("[logging]\nformat = 'xml'", "logging.format", "got 'xml'"),
    # smarthost consistency
    ("[delivery]\nmode = 'smarthost'", "delivery.smarthost.host", "required when delivery.mode = 'smarthost'"),
    ("[delivery]\nmode = 'smarthost'\n[delivery.smarthost]\nhost = 'smtp.example'\nusername = 'u'\ntls = 'none'",
     "delivery.smarthost.tls", "clear text"),
    # trusted networks
    ("[[trusted_networks]]\nnetwork = '10.0.0.0/33'\ndomains = ['a.example']", "trusted_networks[0].network",
     "not a CIDR network: '10.0.0.0/33'"),
    ("[[trusted_networks]]\nnetwork = 'office'\ndomains = ['a.example']", "trusted_networks[0].network",
     "not a CIDR network"),
    ("[[trusted_networks]]\nnetwork = '10.0.0.0/8'", "trusted_networks[0].domains", "list the sending domains"),
    ("[[trusted_networks]]\nnetwork = '10.0.0.0/8'\ndomains = ['a.example', 'not a domain']",
     "trusted_networks[0].domains[1]", "expected a domain name"),
    ("[delivery]\nrequire_tls_domains = ['*.example.com']", "delivery.require_tls_domains[0]",
     "expected a domain name"),
    # nameservers and metrics.listen
    ("[dns]\nnameservers = ['dns.google']", "dns.nameservers[0]", "expected an IP address with optional :port"),
    ("[dns]\nnameservers = ['127.0.0.1', '127.0.0.1:abc']", "dns.nameservers[1]", "got '127.0.0.1:abc'"),
    ("[dns]\nnameservers = ['127.0.0.1:99999']", "dns.nameservers[0]", "port 99999 out of range 1-65535"),
    ("[dns]\nnameservers = ['[::1']", "dns.nameservers[0]", "expected an IP address"),
    ("[metrics]\nlisten = 'localhost:http'", "metrics.listen", "expected host:port"),
    ("[metrics]\nlisten = ':9469'", "metrics.listen", "expected host:port"),
    ("[metrics]\nlisten = 'a:b:c'", "metrics.listen", "expected host:port"),
    ("[metrics]\nlisten = '127.0.0.1:70000'", "metrics.listen", "port 70000 out of range"),
    # values
    ("[server]\nhostname = 'relay example'", "server.hostname", "expected a DNS host name"),
    ("[server]\nhostname = ''", "server.hostname", "expected a DNS host name"),
    ("[delivery]\nhelo_hostname = 'bad_name!'", "delivery.helo_hostname", "expected a DNS host name"),
    ("[limits]\nrecipients = 0", "limits.recipients", "must be > 0, got 0"),
    ("[limits]\nauth_failure_delay = -1", "limits.auth_failure_delay", "must be >= 0"),
    ("[delivery]\nretry_schedule = []", "delivery.retry_schedule", "at least one delay"),
    ("[delivery]\nretry_schedule = [60, 0]", "delivery.retry_schedule[1]", "must be > 0"),
    ("[credentials]\nper_domain = 0", "credentials.per_domain", "must be > 0"),
    ("[policy]\nfrom_header = 'strict'", "policy.from_header", "must be one of domain, off, got 'strict'"),
    ("[limits]\nauth_ipv6_prefix = 129", "limits.auth_ipv6_prefix", "prefix length from 8 to 128, got 129"),
    ("[limits]\nauth_ipv4_prefix = 33", "limits.auth_ipv4_prefix", "prefix length from 8 to 32, got 33"),
    ("[limits]\nauth_pending = 0", "limits.auth_pending", "must be > 0"),
    ("[limits]\ntls_handshakes = 0", "limits.tls_handshakes", "must be > 0"),
    ("[credentials]\nargon2_memory_cost = 16\nargon2_parallelism = 4", "credentials.argon2_memory_cost",
     "at least 8 x argon2_parallelism"),
]


@pytest.mark.parametrize("text,key,problem", BAD, ids=[b[1] + ":" + b[2][:30] for b in BAD])
def test_bad_value_names_the_key(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text + "\n"))
    err = info.value
    assert err.key == key
    assert problem in err.problem
    # Arrays of tables also say which block, counting from 1 as people do.
    block = config._with_block_number(key)
    assert str(err) == f"config error: {block}: {err.problem}"
    assert "\n" not in str(err)


def test_message_format_from_the_issue(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "[limits]\nrecipients = 'x'\n"))
    assert str(info.value) == "config error: limits.recipients: expected an integer, got 'x'"


def test_invalid_toml_syntax_names_the_file(tmp_path):
    p = write(tmp_path, "[limits]\nrecipients = \n")
    with pytest.raises(ConfigError) as info:
        config.load(p)
    assert info.value.key == str(p)
    assert info.value.problem.startswith("invalid TOML: ") and "line 2" in info.value.problem
    assert "\n" not in str(info.value)


def test_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "relay.toml"
    p.write_bytes(b'[server]\nhostname = "caf\xe9"\n')  # Latin-1, as an old editor might save it
    with pytest.raises(ConfigError) as info:
        config.load(p)
    assert info.value.key == str(p) and "not UTF-8" in info.value.problem


def test_missing_explicit_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(p)
    assert info.value.key == str(p) and info.value.problem == "config file not found"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert info.value.key == str(tmp_path) and "cannot read" in info.value.problem


def test_relay_config_env_selects_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RELAY_CONFIG", str(write(tmp_path, "[limits]\nrecipients = 3\n", "env.toml")))
    assert config.load().limits.recipients == 3
    # An explicit path wins over the environment.
    assert config.load(write(tmp_path, "[limits]\nrecipients = 4\n", "arg.toml")).limits.recipients == 4


def test_relay_config_env_missing_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RELAY_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="config file not found"):
        config.load()


def test_empty_relay_config_env_means_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RELAY_CONFIG", "")
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "[limits]\nrecipients = 9\n")
    assert config.load().limits.recipients == 9


# ------------------------------------------------------------------ accepted values and normalisation

def test_valid_overrides_are_applied(tmp_path):
    cfg = config.load(write(tmp_path, """
[server]
hostname = "relay.example.net"
[[listeners]]
address = "127.0.0.1"
port = 0
tls = "implicit"
[delivery]
mode = "smarthost"
[delivery.smarthost]
host = "smtp.example.net"
port = 465
tls = "implicit"
username = "relay"
password = "s3cret"
[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53", "::1"]
[limits]
auth_failure_delay = 0
[metrics]
listen = "[::1]:0"
"""))
    assert cfg.listeners == (config.Listener("127.0.0.1", 0, "implicit"),)  # port 0: ephemeral
    assert cfg.delivery.smarthost.resolved_password() == "s3cret"
    assert cfg.dns.nameservers == ("127.0.0.1:5353", "[::1]:53", "::1")
    assert cfg.limits.auth_failure_delay == 0.0 and isinstance(cfg.limits.auth_failure_delay, float)


def test_smarthost_password_from_environment(monkeypatch):
    cfg = config.from_dict({"delivery": {"smarthost": {"password": "in-file", "password_env": "RELAY_TEST_PW"}}})
    monkeypatch.setenv("RELAY_TEST_PW", "from-env")
    assert cfg.delivery.smarthost.resolved_password() == "from-env"


def test_domains_in_config_are_stored_lower_case_ascii():
    # Policy compares them with lower-case IDNA sender domains: 'MG.Example.com' must still match.
    cfg = config.from_dict({
        "trusted_networks": [{"network": "10.0.0.0/8", "domains": ["MG.Example.COM", "Bücher.example."]}],
        "delivery": {"require_tls_domains": ["Bank.Example"]},
    })
    assert cfg.trusted_networks[0].domains == ("mg.example.com", "xn--bcher-kva.example")
    assert cfg.delivery.require_tls_domains == ("bank.example",)


# ------------------------------------------------------------------ parse_hostport

@pytest.mark.parametrize("text,expected", [
    ("mx.example", ("mx.example", 25)),
    ("mx.example:2525", ("mx.example", 2525)),
    ("127.0.0.1", ("127.0.0.1", 25)),
    ("127.0.0.1:53", ("127.0.0.1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[::1]", ("::1", 25)),
    ("::1", ("::1", 25)),
    ("2001:db8::1", ("2001:db8::1", 25)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),  # range checks belong to the caller, which knows the key
])
def test_parse_hostport(text, expected):
    assert config.parse_hostport(text, 25) == expected


@pytest.mark.parametrize("text", [
    "host:", "host:abc", "host: 53", "host:+53", "host:5_3", "[::1", "[::1]x", "[::1]:", "[]:53", "a:b:c",
])
def test_parse_hostport_refuses(text):
    with pytest.raises(ValueError):
        config.parse_hostport(text, 25)


# ------------------------------------------------------------------ check_files

def _tls_cfg(tmp_path: Path) -> Config:
    return config.from_dict({"tls": {"cert": str(tmp_path / "relay.crt"), "key": str(tmp_path / "relay.key")}})


def test_check_files_neither_or_both_is_fine(tmp_path):
    cfg = _tls_cfg(tmp_path)
    config.check_files(cfg)  # neither: serve writes a self-signed pair
    (tmp_path / "relay.crt").write_text("cert")
    (tmp_path / "relay.key").write_text("key")
    config.check_files(cfg)


def test_check_files_refuses_a_missing_directory(tmp_path):
    cfg = config.from_dict({"tls": {"cert": str(tmp_path / "nonexistent" / "relay.crt"),
                                    "key": str(tmp_path / "relay.key")}})
    with pytest.raises(ConfigError) as info:
        config.check_files(cfg)
    assert info.value.key == "tls.cert" and f"directory {tmp_path / 'nonexistent'} does not exist" in info.value.problem
    cfg = config.from_dict({"tls": {"cert": str(tmp_path / "relay.crt"), "key": "/nonexistent/dir/relay.key"}})
    with pytest.raises(ConfigError, match="tls.key: .*/nonexistent/dir does not exist"):
        config.check_files(cfg)


def test_check_files_allows_the_default_directory_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no certs/ here: serve may create the default one
    config.check_files(config.from_dict({}))
    config.check_files(config.from_dict({"tls": {"cert": "./certs/relay.crt"}}))


@pytest.mark.parametrize("hostname,public_addresses,warnings", [
    ("localhost", [], 2), ("relay", [], 2), ("192.0.2.1", [], 2), ("mail.localdomain", [], 2),
    ("localhost", ["192.0.2.1"], 1), ("mail.example.com", [], 0), ("mail.example.com.", ["192.0.2.1"], 0),
])
def test_dns_warnings(hostname, public_addresses, warnings):
    cfg = config.from_dict({"server": {"hostname": hostname}, "domains": {"public_addresses": public_addresses}})
    found = config.dns_warnings(cfg)
    assert len(found) == warnings, found
    if warnings:
        assert found[0].startswith(f"server.hostname is {hostname!r}")
    if warnings == 2:
        assert "domains.public_addresses" in found[1] and f"a:{hostname}" in found[1]


def test_smarthost_spf_warning_names_the_include():
    cfg = config.from_dict({"delivery": {"mode": "smarthost", "smarthost": {"host": "smtp.example.net"}}})
    assert "domains.spf_include" in config.dns_warnings(cfg)[1]
    cfg = config.from_dict({"delivery": {"mode": "smarthost", "smarthost": {"host": "smtp.example.net"}},
                            "domains": {"spf_include": "_spf.example.net"}})
    assert len(config.dns_warnings(cfg)) == 1


def test_listener_errors_say_which_block_counting_from_one(tmp_path):
    text = "".join(f'[[listeners]]\nport = {p}\n' for p in (25, 587, 70000))
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert str(info.value).startswith("config error: listeners[2].port (the 3rd [[listeners]] block): port 70000")


def test_check_files_cert_without_key(tmp_path):
    cfg = _tls_cfg(tmp_path)
    (tmp_path / "relay.crt").write_text("cert")
    with pytest.raises(ConfigError) as info:
        config.check_files(cfg)
    assert info.value.key == "tls.key"
    assert f"file {tmp_path / 'relay.key'} not found" in info.value.problem


def test_check_files_key_without_cert(tmp_path):
    cfg = _tls_cfg(tmp_path)
    (tmp_path / "relay.key").write_text("key")
    with pytest.raises(ConfigError) as info:
        config.check_files(cfg)
    assert info.value.key == "tls.cert"
    assert f"file {tmp_path / 'relay.crt'} not found" in info.value.problem


# ------------------------------------------------------------------ masked output and to_toml

def test_masked_hides_only_a_set_password():
    cfg = config.from_dict({"delivery": {"smarthost": {"host": "smtp.example", "username": "u", "password": "s3cret"}}})
    data = config.masked(cfg)
    assert data["delivery"]["smarthost"]["password"] == "***"
    assert data["delivery"]["smarthost"]["username"] == "u"
    assert "s3cret" not in json.dumps(data) and "s3cret" not in config.to_toml(data)
    assert config.masked(config.from_dict({}))["delivery"]["smarthost"]["password"] == ""


def test_to_toml_round_trips_the_effective_config():
    cfg = config.from_dict({
        "server": {"hostname": "relay.example.net"},
        "delivery": {"smarthost": {"host": "smtp.example", "password": 'we"ird\\pass\nword\x7f\tü'}},
        "trusted_networks": [{"network": "10.0.0.0/8", "domains": ["a.example", "b.example"]},
                             {"network": "::1/128", "domains": ["c.example"]}],
        "limits": {"auth_failure_delay": 0.25},
    })
    text = config.to_toml(dataclasses.asdict(cfg))
    assert config.from_dict(tomllib.loads(text)) == cfg
