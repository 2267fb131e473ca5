"""storage.backend and the PostgreSQL connection keys: one-line errors, no password in the DSN
or in any message, and backend = 'postgres' refused when it cannot be reached."""
from __future__ import annotations

import pytest

from relay import config
from relay.config import ConfigError, from_dict


def load(**storage):
    return from_dict({"storage": storage})


def refused(**storage) -> str:
    with pytest.raises(ConfigError) as e:
        load(**storage)
    text = str(e.value)
    assert "\n" not in text and "s3cret" not in text
    return text


def test_sqlite_is_the_default_and_takes_no_dsn():
    assert load().storage.backend == "sqlite"
    assert "only used with storage.backend = 'postgres'" in refused(dsn="postgresql://relay@db/relay")
    assert "must be one of sqlite, postgres" in refused(backend="mysql")


def test_postgres_needs_a_dsn_without_a_password():
    assert "storage.dsn: required" in refused(backend="postgres")
    assert "must start with postgresql://" in refused(backend="postgres", dsn="mysql://relay@db/relay")
    for dsn in ("postgresql://relay:s3cret@db/relay", "postgresql://relay@db/relay?password=s3cret"):
        text = refused(backend="postgres", dsn=dsn)
        assert "has a password in it" in text and "storage.password_file" in text and "storage.password_env" in text


def test_a_dsn_may_list_several_hosts_for_failover():
    # libpq-style: the driver tries each host; target_session_attrs=read-write picks the primary
    # (docs/multinode.md). A bad port in any of them is still refused.
    dsn = "postgresql://relay@db1.example.net:5432,db2.example.net:5433/relay?target_session_attrs=read-write"
    assert load(backend="postgres", dsn=dsn).storage.dsn == dsn
    assert load(backend="postgres", dsn="postgresql://relay@db1,db2/relay").storage.backend == "postgres"
    assert "not a postgresql:// URL" in refused(backend="postgres", dsn="postgresql://relay@db1:5432,db2:x/relay")
    assert "has a password in it" in refused(backend="postgres", dsn="postgresql://relay:s3cret@db1,db2/relay")


def test_the_password_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    dsn = "postgresql://relay@db.example.net/relay"
    assert "cannot read" in refused(backend="postgres", dsn=dsn, password_file=str(tmp_path / "none"))
    assert "RELAY_PG_PW is not set" in refused(backend="postgres", dsn=dsn, password_env="RELAY_PG_PW")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    monkeypatch.setenv("RELAY_PG_PW", "s3cret")
    assert "not both" in refused(backend="postgres", dsn=dsn, password_file=str(pw), password_env="RELAY_PG_PW")
    st = config.StorageConfig(backend="postgres", dsn=dsn, password_file=str(pw))
    config.check_postgres_dsn(st)
    assert st.resolved_password() == "s3cret"
    assert config.StorageConfig(backend="postgres", dsn=dsn, password_env="RELAY_PG_PW").resolved_password() == "s3cret"


def test_postgres_loads(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg_file = tmp_path / "relay.toml"
    cfg_file.write_text('[storage]\nbackend = "postgres"\ndsn = "postgresql://relay@db.example.net/relay"\n'
                        f'password_file = "{pw}"\n')
    cfg = config.load(cfg_file)
    assert (cfg.storage.backend, cfg.storage.resolved_password()) == ("postgres", "s3cret")


def test_relay_serve_with_an_unreachable_postgres_refuses_to_start_in_one_line(tmp_path):
    """Nothing answers on the DSN's port: one line naming the DSN, exit != 0, and no SQLite file
    made on the side (no silent fallback)."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[storage]\nbackend = "postgres"\ndsn = "postgresql://relay@127.0.0.1:{port}/relay"\n'
                   'commit_timeout = 3\n[server]\nhostname = "relay.test"\n[tls]\n'
                   f'cert = "{tmp_path}/c.crt"\nkey = "{tmp_path}/c.key"\n')
    out = subprocess.run([sys.executable, "-m", "relay", "queue", "list", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}/relay" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "var").exists()  # nothing was opened or created on the side
