"""[admin] checks: one ConfigError naming the key for each bad value."""
from __future__ import annotations

import pytest

from relay import config
from relay.config import ConfigError


def load(admin: dict) -> config.Config:
    return config.from_dict({"admin": admin})


@pytest.mark.parametrize("admin", [
    {"listen": "127.0.0.1:8025"}, {"listen": ""}, {"listen": "[::1]:8025"}, {"listen": "localhost:0"},
    {"listen": "0.0.0.0:8025", "tls": True}, {"listen": "192.0.2.1:8025", "allow_insecure_http": True},
    {"public_origin": "https://relay.example.com:8025"}, {"trusted_proxies": ["127.0.0.1/32", "::1"]},
])
def test_good_admin_settings_load(admin):
    assert load(admin).admin.listen == admin.get("listen", "127.0.0.1:8025")


@pytest.mark.parametrize("admin, key, words", [
    ({"listen": "8025"}, "admin.listen", "host:port"),
    ({"listen": ":8025"}, "admin.listen", "host:port"),
    ({"listen": "127.0.0.1:99999"}, "admin.listen", "host:port"),
    ({"listen": "127.0.0.1:http"}, "admin.listen", "host:port"),
    ({"listen": "0.0.0.0:8025"}, "admin.listen", "not a loopback address"),
    ({"listen": "[2001:db8::1]:8025"}, "admin.listen", "admin.tls = true"),
    ({"public_origin": "relay.example.com"}, "admin.public_origin", "scheme://"),
    ({"public_origin": "https://relay.example.com/admin"}, "admin.public_origin", "scheme://"),
    ({"trusted_proxies": ["10.0.0.300/8"]}, "admin.trusted_proxies[0]", "CIDR"),
    ({"session_idle_timeout": 0}, "admin.session_idle_timeout", "> 0"),
    ({"login_failures": -1}, "admin.login_failures", "> 0"),
])
def test_bad_admin_settings_name_the_key(admin, key, words):
    with pytest.raises(ConfigError) as err:
        load(admin)
    assert err.value.key == key
    assert key in str(err.value) and words in str(err.value)
    assert "\n" not in str(err.value)
