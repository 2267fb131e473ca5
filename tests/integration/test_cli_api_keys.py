"""`relay admin api-key add/list/revoke` through the installed console script: the token is
printed once (never listed), only its SHA-256 is stored, every change is audited with the OS
user, and the API takes the token until it is revoked."""
from __future__ import annotations

import getpass
import hashlib
import json
import sqlite3

import requests

from relay import config as config_mod
from tests.support.api_server import ApiServer
from tests.support.relay_instance import RelayInstance


def test_api_key_lifecycle_from_the_cli(tmp_path):
    inst = RelayInstance(tmp_path / "relay")
    cp = inst.cli("admin", "api-key", "list")
    assert cp.returncode == 1 and "does not exist" in cp.stderr  # read commands create no database
    cp = inst.cli("admin", "api-key", "add", "deploy bot", "--scope", "read")
    assert cp.returncode == 0, cp.stderr
    token = next(line.split(": ", 1)[1] for line in cp.stdout.splitlines() if line.startswith("token: "))
    key_id = token.split("_")[1]
    assert f"added API key {key_id} (read) deploy bot" in cp.stdout and "shown once" in cp.stdout

    listed = inst.cli("admin", "api-key", "list")
    assert key_id in listed.stdout and token not in listed.stdout and "active" in listed.stdout
    [row] = json.loads(inst.cli("admin", "api-key", "list", "--json").stdout)
    assert (row["id"], row["scope"], row["revoked_at"]) == (key_id, "read", None) and "token" not in row

    conn = sqlite3.connect(inst.config["storage"]["path"])
    [(stored,)] = conn.execute("SELECT key_hash FROM api_keys").fetchall()
    assert stored == hashlib.sha256(token.split("_", 2)[2].encode()).hexdigest()
    conn.close()

    with ApiServer(config_mod.load(inst.config_path)) as api:
        h = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{api.url}/domains", headers=h, timeout=10).status_code == 200
        assert requests.post(f"{api.url}/domains", headers=h, json={"name": "a.example"}, timeout=10).status_code == 403
        cp = inst.cli("admin", "api-key", "revoke", key_id)
        assert cp.returncode == 0 and f"revoked API key {key_id}" in cp.stdout
        r = requests.get(f"{api.url}/domains", headers=h, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

    cp = inst.cli("admin", "api-key", "revoke", key_id)
    assert (cp.returncode, cp.stderr) == (1, f"relay: API key {key_id} is already revoked\n")
    cp = inst.cli("admin", "api-key", "revoke", "nosuchkey")
    assert (cp.returncode, cp.stderr) == (1, "relay: API key nosuchkey not found\n")
    cp = inst.cli("admin", "api-key", "add", "x", "--scope", "admin")
    assert cp.returncode == 2 and cp.stderr.startswith("relay: argument --scope: invalid choice")
    cp = inst.cli("admin", "api-key", "add", "x")
    assert cp.returncode == 2 and "--scope" in cp.stderr

    conn = sqlite3.connect(inst.config["storage"]["path"])
    audit = conn.execute("SELECT actor, via, action, target FROM audit_log ORDER BY id").fetchall()
    conn.close()
    me = getpass.getuser()
    assert audit == [(me, "cli", "api_key.add", key_id), (me, "cli", "api_key.revoke", key_id)]
