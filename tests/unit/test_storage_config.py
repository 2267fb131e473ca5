"""storage.backend and the PostgreSQL connection keys: one-line errors, no password in the DSN
or in any message, and backend = 'postgres' refused at load while parts are not on it yet."""
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


def test_postgres_is_refused_at_load_naming_what_is_not_on_it_yet(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    text = refused(backend="postgres", dsn="postgresql://relay@db.example.net/relay", password_file=str(pw))
    assert text.startswith("config error: storage.backend: 'postgres' is a preview")
    for part in config.POSTGRES_NOT_YET:
        assert part in text


def test_relay_serve_with_postgres_refuses_to_start_in_one_line(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[storage]\nbackend = "postgres"\ndsn = "postgresql://relay@127.0.0.1/relay"\n')
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "storage.backend: 'postgres' is a preview" in lines[0], out.stderr
    assert not (tmp_path / "var").exists()  # nothing was opened or created on the side
