"""Run the real relay (the installed `relay` console script) from a temporary config, on ephemeral ports.

The relay logs JSON lines; the harness reads them in a thread, learns the bound ports from the
`listening` events and waits for `ready`. Tests reach peers (DNS, MX sinks) through config, as
an operator would: nothing in the relay is monkeypatched.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}


def relay_executable() -> list[str]:
    """The installed console script next to this Python (what users run), else `python -m relay`."""
    script = Path(sys.executable).parent / "relay"
    if script.exists():
        return [str(script)]
    found = shutil.which("relay")
    return [found] if found else [sys.executable, "-m", "relay"]


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(data: dict) -> str:
    lines: list[str] = []

    def emit(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not (
            isinstance(v, list) and v and isinstance(v[0], dict))}
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            if isinstance(v, dict):
                lines.append(f"\n[{name}]")
                emit(name, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    emit(name, item)

    emit("", data)
    return "\n".join(lines) + "\n"


_LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, Any]:
    """key=value pairs of one logfmt line (quoted values unescaped, digits as int)."""
    out: dict[str, Any] = {}
    for key, value in _LOGFMT_FIELD.findall(line):
        if value.startswith('"'):
            value = re.sub(r'\\(.)', r'\1', value[1:-1])
        out[key] = int(value) if value.isdigit() else value
    return out


def client_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RelayInstance:
    def __init__(self, workdir: Path, *, dns: str | None = None, mx_port: int | None = None,
                 config: dict | None = None, env: dict[str, str] | None = None, nofile: int | None = None,
                 log_to_file: bool = False):
        self.dir = Path(workdir)
        # The benchmark's mode: the relay logs to a file (as it would under systemd) that the
        # harness reads only when asked (`log_paused`), so parsing never competes with the
        # system under test; tests read the pipe as it comes.
        self.log_to_file = log_to_file
        self.log_paused = threading.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        base: dict[str, Any] = {
            "server": {"hostname": "relay.test", "shutdown_grace": 5},
            "listeners": [
                {"address": "127.0.0.1", "port": 0, "tls": "starttls"},
                {"address": "127.0.0.1", "port": 0, "tls": "implicit"},
            ],
            "tls": {"cert": str(self.dir / "relay.crt"), "key": str(self.dir / "relay.key")},
            "storage": {"path": str(self.dir / "relay.db")},
            "delivery": {"retry_schedule": [1, 2, 4]},
            "dns": {"timeout": 2},
            "limits": {"auth_failure_delay": 0.05},
            "credentials": dict(FAST_ARGON2),
            "refusal": {"address": "127.0.0.1", "pop3_port": 0, "imap_port": 0, "pop3s_port": 0, "imaps_port": 0},
            "metrics": {"listen": "127.0.0.1:0"},
            # Off unless a test turns it on (e.g. "127.0.0.1:0"): relays running side by side
            # (another worktree's suite too) must not fight over the default 127.0.0.1:8025.
            "admin": {"listen": ""},
            "logging": {"format": "json", "level": "info"},
        }
        if dns:
            base["dns"]["nameservers"] = [dns]
        if mx_port:
            base["delivery"]["mx_port"] = mx_port
        self.config = _merge(base, config or {})
        self.config_path = self.dir / "relay.toml"
        self.env = {**os.environ, **(env or {})}
        self.nofile = nofile  # RLIMIT_NOFILE (soft = hard) for `serve`: out-of-descriptor tests
        self.proc: subprocess.Popen | None = None
        self.events: list[dict] = []
        self.raw_log: list[str] = []
        self._lock = threading.Lock()
        self.ports: dict[str, int] = {}
        self.listener_ports: list[int] = []  # the SMTP listeners' bound ports, in config order
        self.write_config()

    # ------------------------------------------------------------ config and CLI

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def cli(self, *args: str, input: str | None = None, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cp = subprocess.run(relay_executable() + ["-c", str(self.config_path), *args], input=input, text=True,
                            capture_output=True, timeout=60, env={**self.env, **(env or {})})
        if check and cp.returncode != 0:
            raise AssertionError(f"relay {' '.join(args)} -> {cp.returncode}: {cp.stderr}")
        return cp

    def add_user(self, username: str, password: str) -> None:
        domain = username.rpartition("@")[2]
        self.cli("domain", "add", domain)  # may already exist
        self.cli("user", "add", username, "--password-stdin", input=password + "\n", check=True)

    # ------------------------------------------------------------ process

    def start(self, timeout: float = 30) -> "RelayInstance":
        with self._lock:
            self.events.clear()
        self.ports = {}
        preexec = None
        if self.nofile is not None:
            def preexec(n: int = self.nofile) -> None:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        log_file = open(self.dir / "relay.log", "ab") if self.log_to_file else None
        start = log_file.tell() if log_file is not None else 0
        try:
            self.proc = subprocess.Popen(relay_executable() + ["-c", str(self.config_path), "serve"],
                                         stdout=subprocess.DEVNULL, stderr=log_file or subprocess.PIPE,
                                         env=self.env, preexec_fn=preexec)
        finally:
            if log_file is not None:
                log_file.close()
        if self.log_to_file:
            self._reader = threading.Thread(target=self._tail_log, args=(self.proc, start), daemon=True)
        else:
            self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self.wait_event("ready", timeout=timeout):
            self.kill()
            raise RuntimeError("relay did not become ready:\n" + "\n".join(self.raw_log[-30:]))
        self.listener_ports = []
        for e in self.events_named("listening"):
            key = e.get("refusal") or ("metrics" if e.get("metrics") else "admin" if e.get("admin") else e.get("tls"))
            if e.get("proxy_protocol"):
                key = f"proxy_{key}"  # "proxy_starttls", "proxy_implicit"
            self.ports.setdefault(key, e["port"])
            if not e.get("refusal") and not e.get("metrics") and not e.get("admin"):
                self.listener_ports.append(e["port"])
        return self

    def _tail_log(self, proc: subprocess.Popen, start: int) -> None:
        with open(self.dir / "relay.log", "rb") as f:
            f.seek(start)  # this run's lines (the file may hold earlier runs')
            while True:
                if self.log_paused.is_set() and proc.poll() is None:
                    time.sleep(0.05)
                    continue
                raw = f.readline()
                if raw.endswith(b"\n"):
                    self._take_line(raw)
                elif proc.poll() is not None:
                    if raw:
                        self._take_line(raw)
                    return
                else:
                    if raw:
                        f.seek(-len(raw), os.SEEK_CUR)  # half a line: read it whole later
                    time.sleep(0.02)

    def _read_log(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            self._take_line(raw)

    def _take_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        with self._lock:
            self.raw_log.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                fields = parse_logfmt(line)  # logging.format = "logfmt" (what operators see)
                if "event" in fields:
                    self.events.append(fields)

    def events_named(self, name: str, **match: Any) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, name: str, timeout: float = 10, count: int = 1, **match: Any) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events_named(name, **match)) >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None and name != "stopped":
                time.sleep(0.1)
                return len(self.events_named(name, **match)) >= count
            time.sleep(0.02)
        return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._drain_log()
        return self.proc.returncode

    def _drain_log(self) -> None:
        """After exit, let the reader thread take the last lines, so events_named sees all of them."""
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self._drain_log()

    def restart(self) -> "RelayInstance":
        self.kill()
        return self.start()

    def __enter__(self) -> "RelayInstance":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------ clients and inspection

    @property
    def port(self) -> int:
        return self.ports["starttls"]

    def smtp(self, *, implicit: bool = False, timeout: float = 10, source: str | None = None) -> smtplib.SMTP:
        """A connected client; on the STARTTLS port it has already done STARTTLS + EHLO."""
        kw = {"source_address": (source, 0)} if source else {}
        if implicit:
            s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", self.ports["implicit"], timeout=timeout,
                                               context=client_tls_context(), **kw)
            s.ehlo("client.test")
            return s
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=timeout, **kw)
        s.ehlo("client.test")
        s.starttls(context=client_tls_context())
        s.ehlo("client.test")
        return s

    def submit(self, username: str, password: str, sender: str, rcpts: list[str], data: bytes | str,
               implicit: bool = False, timeout: float = 10) -> str:
        """Authenticate and send one message; returns the queue id from the 250 reply."""
        s = self.smtp(implicit=implicit, timeout=timeout)
        try:
            s.login(username, password)
            code, msg = s.mail(sender)
            assert code == 250, (code, msg)
            for r in rcpts:
                code, msg = s.rcpt(r)
                assert code == 250, (code, msg)
            code, msg = s.data(data)
            assert code == 250, (code, msg)
            return msg.decode().rsplit(" ", 1)[-1]
        finally:
            try:
                s.quit()
            except smtplib.SMTPException:
                pass

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.config["storage"]["path"], timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def queued(self) -> list[dict]:
        """What is still in the queue (finished messages kept for `queue history` are not)."""
        with contextlib.closing(self.db()) as conn:
            return [dict(r) for r in conn.execute(
                "SELECT m.id, m.sender, r.rcpt, r.state, r.attempts, r.last_error FROM messages m "
                "JOIN recipients r ON r.msg_id = m.id WHERE m.finished_at IS NULL ORDER BY m.created_at, r.id")]

    def body(self, qid: str) -> bytes | None:
        with contextlib.closing(self.db()) as conn:
            row = conn.execute("SELECT data FROM bodies WHERE id = ?", (qid,)).fetchone()
            return bytes(row["data"]) if row else None

    def metrics_text(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5) as r:
            return r.read().decode()


def wait_until(predicate, timeout: float = 15, what: str = "condition", interval: float = 0.02):
    """Poll `predicate` until it is truthy (and return its value), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
