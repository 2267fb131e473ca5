#!/usr/bin/env python3
"""Benchmark: throughput, latency, CPU and memory of the relay, side by side with Postfix.

Run from the repository root with the project's venv: `make bench` (or `.venv/bin/python bench/run.py`).
Everything runs on 127.0.0.1, bounded in messages and time, and is stopped afterwards.

Scenarios (see README "Benchmark"):
  1  authenticated submission: N clients, STARTTLS + AUTH PLAIN + one 10 KB message per
     connection, and the same with connection reuse (many messages per session)
  2  trusted-network path driven by Postfix's smtp-source (no TLS/AUTH), relay -> sink
  3  sizes 1/10/100 KB and concurrency 1/20/100 for scenario 1
  4  queue scale: enqueue 100,000 messages with delivery paused; enqueue and claim cost at 1k and 100k
  5  1,000 idle connections: relay RSS, and banner latency of a new client meanwhile
  6  hostile destination: a backlog of 2,400 messages to a tarpit that stalls at RCPT, then a
     steady flow to a healthy domain (MX mode, loopback DNS): the healthy flow's latency p50/p99
     and throughput, the tarpit's most concurrent connections; sink counts checked
  7  large messages, relay and Postfix interleaved rep by rep (trusted network, no TLS/AUTH, both
     relaying to the sink): (a) 50 clients each send one 10 MB message at once: peak PSS of all
     processes of each MTA, how long after the last delivery it came back within 50 MB of the
     start (watched up to 60 s; pss_end: when the watch ended); (b) `smtp-source -s 20 -l 1048576`: msgs/s end to end and CPU-ms a message
  8  scenario 2 with the web admin on and one logged-in admin reloading the queue page every
     second, against scenario 2 with the admin off, interleaved rep by rep (README: within 5 %)
  9  authenticated path, relay and Postfix interleaved rep by rep: STARTTLS + AUTH PLAIN, 20
     clients, 10 KB, a new connection per message, the client at TLS 1.3 and capped at TLS 1.2
     (bench/authload.py: one process per client); msgs/s end to end, DATA -> 250 p50/p99, CPU
     a message of each MTA and of the load generator itself, sink counts checked

With scenario 2 and/or 9 the run ends with one table of issue 16's cells (relay vs Postfix in
the same run, median [min-max], per-rep ratios), each with its command.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.relay_instance import RelayInstance, client_tls_context  # noqa: E402

import authload  # noqa: E402  (bench/, this script's directory)
from summary import Cell, table  # noqa: E402

USER = "bench@bench.example"
PASSWORD = "benchmark password 1"
RCPT = "sink@sink.example"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    """The relay's processes: `relay serve` and the delivery process it starts."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid] + [int(k) for k in kids]


def family_cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += proc_cpu(p)
        except OSError:
            pass
    return total


def family_rss_kb(pids: list[int], key: str = "VmRSS") -> int:
    """Summed over the processes (for VmHWM: the sum of each one's peak, an upper bound)."""
    total = 0
    for p in pids:
        try:
            total += proc_rss_kb(p, key)
        except OSError:
            pass
    return total


def family_pss_kb(pids: list[int]) -> int:
    """Proportional set size summed: shared pages (the interpreter, libraries) counted once."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def proc_rss_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# ---------------------------------------------------------------- sink

class Sink:
    """Postfix's smtp-sink when installed (fast, not ours), else an aiosmtpd sink; counts messages."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self.kind = "smtp-sink" if shutil.which("smtp-sink") else "aiosmtpd"
        if self.kind == "smtp-sink":
            cmd = ["smtp-sink", "-c", f"127.0.0.1:{self.port}", "1024"]
            if os.geteuid() == 0:
                cmd[1:1] = ["-u", "nobody"]
        else:
            cmd = [sys.executable, str(ROOT / "bench" / "pysink.py"), str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

    def _read(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(4096) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(1)
            if not chunk:
                return
            buf = (buf + chunk)[-200:]
            m = re.findall(rb"mesg=(\d+)", buf)
            if m:
                self.count = int(m[-1])

    def wait_for(self, n: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count >= n:
                return time.monotonic()
            time.sleep(0.005)
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- relay under test

RELAY_SERVER: dict = {}  # [server] keys for every relay of the run (--acceptance-workers, --event-loop)


def start_relay(workdir: Path, sink: Sink, *, trusted: bool = False, extra: dict | None = None,
                dkim: bool = True) -> RelayInstance:
    cfg = {
        "server": dict(RELAY_SERVER),
        "delivery": {"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none"},
                     "max_connections_per_destination": 20},
        "limits": {"connections_per_ip": 5000, "connections": 5000, "auth_failure_delay": 1.0},
        "logging": {"format": "json", "level": "info"},
    }
    if trusted:
        cfg["trusted_networks"] = [{"network": "127.0.0.0/8", "domains": ["bench.example"]}]
    if extra:
        for k, v in extra.items():
            cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    # The relay logs to a file the harness leaves alone while a run is measured (log_paused).
    inst = RelayInstance(workdir, config=cfg, log_to_file=True)
    if not dkim:  # the same work as a Postfix without a signing milter
        inst.cli("domain", "add", USER.rpartition("@")[2], "--no-dkim", check=True)
    inst.add_user(USER, PASSWORD)
    inst.start()
    return inst


def metric(relay: RelayInstance, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", relay.metrics_text(), re.M)
    return float(m.group(1)) if m else 0.0


# ---------------------------------------------------------------- SMTP load client (asyncio, pipelined)

async def _reply(r: asyncio.StreamReader) -> bytes:
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _expect(r: asyncio.StreamReader, code: bytes) -> None:
    line = await _reply(r)
    if not line.startswith(code):
        raise RuntimeError(f"expected {code!r}, got {line!r}")


def make_message(size: int, n: int) -> bytes:
    head = (f"From: <{USER}>\r\nTo: <{RCPT}>\r\nSubject: bench {n}\r\n"
            f"Message-ID: <{n}.{time.time_ns()}@bench.example>\r\n\r\n").encode()
    line = b"X" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def submit_load(port: int, *, clients: int, messages: int, per_session: int, size: int,
                      time_limit: float) -> dict:
    ctx = client_tls_context()
    auth = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    latencies: list[float] = []
    next_n = 0
    errors = 0
    deadline = time.monotonic() + time_limit
    data = make_message(size, 0)

    async def one_session() -> None:
        nonlocal next_n, errors
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        try:
            await _expect(r, b"220")
            w.write(b"EHLO bench.client\r\n")
            await _expect(r, b"250")
            w.write(b"STARTTLS\r\n")
            await _expect(r, b"220")
            await w.start_tls(ctx)
            w.write(b"EHLO bench.client\r\nAUTH PLAIN " + auth + b"\r\n")
            await _expect(r, b"250")
            await _expect(r, b"235")
            for _ in range(per_session):
                if next_n >= messages or time.monotonic() > deadline:
                    break
                next_n += 1
                w.write(f"MAIL FROM:<{USER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
                await _expect(r, b"250")
                await _expect(r, b"250")
                await _expect(r, b"354")
                w.write(data + b".\r\n")
                t0 = time.perf_counter()
                await _expect(r, b"250")
                latencies.append(time.perf_counter() - t0)
            w.write(b"QUIT\r\n")
            await _reply(r)
        except (OSError, RuntimeError, ConnectionError, ssl.SSLError) as exc:
            errors += 1
            if errors <= 3:
                print(f"  client error: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            w.close()

    async def worker() -> None:
        while next_n < messages and time.monotonic() < deadline:
            await one_session()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"accepted": len(latencies), "seconds": time.monotonic() - t0, "latencies": latencies,
            "errors": errors, "start": t0}


# ---------------------------------------------------------------- scenarios

def run_submission(workdir: Path, sink: Sink, *, clients: int, messages: int, per_session: int, size: int,
                   time_limit: float = 120) -> dict:
    relay = start_relay(workdir, sink)
    try:
        pids = family(relay.proc.pid)
        base_sink = sink.count
        cpu0 = family_cpu(pids)
        commits0 = metric(relay, "relay_store_commits_total")
        res = asyncio.run(submit_load(relay.port, clients=clients, messages=messages, per_session=per_session,
                                      size=size, time_limit=time_limit))
        end = sink.wait_for(base_sink + res["accepted"], timeout=120)
        cpu = family_cpu(pids) - cpu0
        commits = metric(relay, "relay_store_commits_total") - commits0
        n = res["accepted"]
        return {
            "clients": clients, "size": size, "per_session": per_session, "messages": n, "errors": res["errors"],
            "accepted_per_s": n / res["seconds"] if res["seconds"] else 0,
            "end_to_end_per_s": n / (end - res["start"]) if end and n else None,
            "p50_ms": pct(res["latencies"], 50) * 1000, "p95_ms": pct(res["latencies"], 95) * 1000,
            "p99_ms": pct(res["latencies"], 99) * 1000,
            "cpu_s_per_1000": cpu / n * 1000 if n else None,
            "peak_rss_mb": family_rss_kb(pids, "VmHWM") / 1024,
            "commits_per_msg": commits / n if n else None,
        }
    finally:
        relay.stop()


SOURCE_CPU = {"s": 0.0}  # smtp-source's own CPU in the last run_smtp_source (client-bound runs show)


def run_smtp_source(port: int, sink: Sink, messages: int, sessions: int, size: int,
                    relay: RelayInstance | None = None) -> tuple[float, float | None]:
    """smtp-source into `port`; a relay's log is not parsed by us while it runs."""
    if relay is not None:
        relay.log_paused.set()
    try:
        return _run_smtp_source(port, sink, messages, sessions, size)
    finally:
        if relay is not None:
            relay.log_paused.clear()


def _run_smtp_source(port: int, sink: Sink, messages: int, sessions: int, size: int) -> tuple[float, float | None]:
    base = sink.count
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", USER, "-t", RCPT, f"127.0.0.1:{port}"], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    accepted = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    SOURCE_CPU["s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    end = sink.wait_for(base + messages, timeout=300)
    return messages / accepted, (messages / (end - t0) if end else None)


def scenario2_relay(workdir: Path, sink: Sink, messages: int, dkim: bool = False) -> dict:
    relay = start_relay(workdir, sink, trusted=True, dkim=dkim)
    try:
        pids = family(relay.proc.pid)
        cpu0 = family_cpu(pids)
        base = sink.count
        acc, e2e = run_smtp_source(relay.port, sink, messages, 20, 10240, relay)
        cpu = family_cpu(pids) - cpu0
        return {"accepted_per_s": acc, "end_to_end_per_s": e2e, "cpu_s_per_1000": cpu / messages * 1000,
                "source_cpu_s_per_1000": SOURCE_CPU["s"] / messages * 1000,
                "peak_rss_mb": family_rss_kb(pids, "VmHWM") / 1024, "sink_received": sink.count - base}
    finally:
        relay.stop()


def scenario2_ceiling(sink: Sink, messages: int) -> dict:
    """The loopback ceiling: the same smtp-source straight into the sink, no MTA between."""
    base = sink.count
    acc, e2e = run_smtp_source(sink.port, sink, messages, 20, 10240)
    return {"accepted_per_s": acc, "end_to_end_per_s": e2e,
            "source_cpu_s_per_1000": SOURCE_CPU["s"] / messages * 1000, "sink_received": sink.count - base}


class Postfix:
    """A throwaway Postfix on loopback (own config and queue directories) relaying to the sink."""

    def __init__(self, workdir: Path, sink: Sink, *, auth: bool = False):
        self.dir = workdir
        self.port = free_port()
        conf = workdir / "etc"
        conf.mkdir(parents=True)
        (workdir / "spool").mkdir()
        (workdir / "data").mkdir()
        master = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            if line.startswith("smtp ") and " inet " in line:
                line = f"127.0.0.1:{self.port} inet n - n - - smtpd"
            elif line and not line[0].isspace() and not line.startswith("#"):
                cols = line.split()
                if len(cols) >= 8:
                    cols[4] = "n"  # no chroot: the throwaway spool has no chroot tree
                    line = " ".join(cols)
            master.append(line)
        (conf / "master.cf").write_text("\n".join(master) + "\n")
        (conf / "main.cf").write_text(main_cf(f"""
compatibility_level = 3.6
queue_directory = {workdir}/spool
data_directory = {workdir}/data
mail_owner = postfix
myhostname = postfix.bench.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink.port}
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {workdir}/maillog
maillog_file_prefixes = {workdir}
smtp_tls_security_level = none
smtpd_tls_security_level = none
""", postfix_auth_conf(workdir, conf) if auth else ""))
        self.env = {**os.environ, "MAIL_CONFIG": str(conf)}
        self.conf = conf
        subprocess.run(["postfix", "-c", str(conf), "set-permissions"], env=self.env, capture_output=True)
        cp = subprocess.run(["postfix", "-c", str(conf), "start"], env=self.env, capture_output=True, text=True)
        if cp.returncode != 0:
            raise RuntimeError(f"postfix start failed: {cp.stderr.strip()}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("postfix did not start listening")

    def master_pid(self) -> int | None:
        p = self.dir / "spool" / "pid" / "master.pid"
        try:
            return int(p.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], env=self.env, capture_output=True)


def main_cf(base: str, overrides: str) -> str:
    """`base` main.cf text with every parameter set again in `overrides` replaced by that setting
    (Postfix would take the later one too, with a warning in every daemon's log)."""
    def key(line: str) -> str | None:
        name, eq, _ = line.partition("=")
        return name.strip() if eq and line[:1].strip() and not line.startswith("#") else None
    over = [ln for ln in overrides.splitlines() if ln.strip()]
    names = {key(ln) for ln in over} - {None}
    kept = [ln for ln in base.splitlines() if key(ln) not in names]
    return "\n".join(kept + over).strip() + "\n"


def postfix_auth_conf(workdir: Path, conf: Path) -> str:
    """STARTTLS and AUTH PLAIN for the throwaway Postfix (scenario 9): a self-signed certificate,
    Cyrus SASL with the bench user in a sasldb of its own (auxprop, PLAIN LOGIN), relaying only
    for an authenticated client (mynetworks does not let loopback through), AUTH only after TLS.
    Returns the main.cf lines (later settings of the same name win in main.cf)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=postfix.bench.example", "-keyout", str(conf / "key.pem"),
                    "-out", str(conf / "cert.pem")], check=True, capture_output=True, timeout=60)
    (conf / "key.pem").chmod(0o600)
    db = conf / "sasldb2"
    user, _, realm = USER.partition("@")
    subprocess.run(["saslpasswd2", "-f", str(db), "-c", "-p", "-u", realm, user], input=PASSWORD.encode(),
                   check=True, capture_output=True, timeout=30)
    shutil.chown(db, "postfix")  # smtpd runs as postfix and reads it
    db.chmod(0o640)
    # Debian's Postfix looks for <cyrus_sasl_config_path>/sasl/<smtpd_sasl_path>.conf (seen with strace).
    (conf / "sasl").mkdir()
    (conf / "sasl" / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                     f"mech_list: PLAIN LOGIN\nsasldb_path: {db}\n")
    return f"""
smtpd_tls_security_level = may
smtpd_tls_cert_file = {conf}/cert.pem
smtpd_tls_key_file = {conf}/key.pem
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {conf}
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
"""


def scenario2_postfix(workdir: Path, sink: Sink, messages: int) -> dict:
    pf = Postfix(workdir, sink)
    try:
        pid = pf.master_pid()
        assert pid is not None
        cpu0 = tree_cpu(pid)
        base = sink.count
        acc, e2e = run_smtp_source(pf.port, sink, messages, 20, 10240)
        return {"accepted_per_s": acc, "end_to_end_per_s": e2e, "cpu_s_per_1000": (tree_cpu(pid) - cpu0) / messages * 1000,
                "source_cpu_s_per_1000": SOURCE_CPU["s"] / messages * 1000, "sink_received": sink.count - base}
    finally:
        pf.stop()


async def _queue_scale(path: str, total: int) -> dict:
    from relay import db
    from relay.store.sqlite_queue import NewMessage, NewRecipient, QueueStore
    conn = await db.open_async(path)
    q = QueueStore(conn)
    data = make_message(10240, 0)
    msg = NewMessage(USER, (NewRecipient(RCPT, "sink.example"),), data)
    done = 0
    marks: dict[int, float] = {}

    async def enqueue_batch(n: int) -> float:
        t0 = time.perf_counter()
        # 20 concurrent submitters, as with 20 clients: group commit applies.
        per = n // 20
        await asyncio.gather(*(asyncio.gather(*(q.enqueue(msg) for _ in range(per))) for _ in range(20)))
        return (time.perf_counter() - t0) / (per * 20)

    async def claim_cost() -> float:
        t0 = time.perf_counter()
        jobs = await q.claim(200)
        cost = (time.perf_counter() - t0) / max(1, sum(len(j.recipients) for j in jobs))
        await asyncio.gather(*(q.release(j) for j in jobs))  # back to due, outside the timing
        return cost

    out = {}
    while done < total:
        step = 1000 if done < 1000 else min(10000, total - done)
        cost = await enqueue_batch(step)
        done += step
        if done in (1000, total):
            out[f"enqueue_us_per_msg_at_{done}"] = cost * 1e6
            out[f"claim_us_per_rcpt_at_{done}"] = (await claim_cost()) * 1e6
    await q.close()
    await conn.close()
    size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    out["db_mb"] = size / 1e6
    return out


def scenario4(workdir: Path, total: int) -> dict:
    return asyncio.run(_queue_scale(str(workdir / "scale.db"), total))


async def _idle(port: int, n: int, pid: int) -> dict:
    pids = family(pid)
    rss0 = family_rss_kb(pids)
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        conns.append(w)
    await asyncio.sleep(0.5)
    rss = family_rss_kb(pids)
    pss = family_pss_kb(pids)
    lat = []
    for _ in range(20):
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        line = await r.readline()
        lat.append(time.perf_counter() - t0)
        assert line.startswith(b"220"), line
        w.close()
    for w in conns:
        w.close()
    return {"idle_connections": n, "rss_mb": rss / 1024, "rss_before_mb": rss0 / 1024, "pss_mb": pss / 1024,
            "banner_p50_ms": pct(lat, 50) * 1000, "banner_max_ms": max(lat) * 1000}


def tree_cpu(pid: int) -> float:
    """CPU of a process and of its children, live (their own and their reaped children's) and
    reaped (cutime/cstime): Postfix's smtpd/cleanup/smtp come and go during a run."""
    def cpu_of(p: int) -> float:
        f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in family(pid):
        try:
            total += cpu_of(p)
        except OSError:
            pass
    return total


class PssSampler:
    """Samples the summed PSS of a process family (re-listed each time: children come and go)."""

    def __init__(self, pid_of) -> None:
        self.pid_of = pid_of
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        pid = self.pid_of()
        return family_pss_kb(family(pid)) / 1024 if pid else 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.now_mb()))
            self._stop.wait(0.1)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)


async def _plain_burst(port: int, clients: int, data: bytes, time_limit: float) -> tuple[int, int]:
    """`clients` connections at once, each one message (no TLS/AUTH: a trusted network). (accepted, errors)."""
    accepted = errors = 0
    stuffed = data.replace(b"\r\n.", b"\r\n..") + b".\r\n"

    async def one() -> None:
        nonlocal accepted, errors
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            try:
                await _expect(r, b"220")
                w.write(b"EHLO bench.client\r\n")
                await _expect(r, b"250")
                w.write(f"MAIL FROM:<{USER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
                await _expect(r, b"250")
                await _expect(r, b"250")
                await _expect(r, b"354")
                w.write(stuffed)
                await w.drain()
                await _expect(r, b"250")
                accepted += 1
                w.write(b"QUIT\r\n")
                await _reply(r)
            finally:
                w.close()
        except (OSError, RuntimeError, ConnectionError) as exc:
            errors += 1
            if errors <= 3:
                print(f"  client error: {type(exc).__name__}: {exc}", file=sys.stderr)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), time_limit)
    return accepted, errors


def large_burst(port: int, pid_of, sink: Sink, clients: int, size: int, settle: float) -> dict:
    """Scenario 7a against whatever listens on `port` (its processes: family(pid_of()))."""
    data = make_message(size, 0)
    base = sink.count
    sampler = PssSampler(pid_of)
    start_mb = sampler.now_mb()
    with sampler:
        t0 = time.monotonic()
        accepted, errors = asyncio.run(_plain_burst(port, clients, data, 600))
        end = sink.wait_for(base + accepted, timeout=600)
        delivered = sink.count - base
        done = time.monotonic()
        # After the burst: how far memory comes back within `settle` seconds.
        # Watched until it is back within 50 MB of the start, for at most `settle` seconds.
        back_at = None
        while time.monotonic() < done + settle:
            if sampler.now_mb() <= start_mb + 50:
                back_at = time.monotonic() - done
                break
            time.sleep(0.5)
    after = sampler.now_mb()
    return {"accepted": accepted, "errors": errors, "delivered": delivered,
            "seconds": (end or done) - t0, "start_pss_mb": start_mb, "peak_pss_mb": sampler.peak(),
            "pss_end_mb": after, "back_within_50mb_s": back_at}


def scenario7a_relay(workdir: Path, sink: Sink, clients: int, size: int, settle: float, dkim: bool) -> dict:
    relay = start_relay(workdir, sink, trusted=True, dkim=dkim)
    try:
        r = large_burst(relay.port, lambda: relay.proc.pid, sink, clients, size, settle)
        db = relay.config["storage"]["path"]
        r["db_mb_after"] = sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p)) / 1e6
        spool = Path(db + ".spool")
        # The sink counts a message before the relay has settled it (and unlinked its file).
        deadline = time.monotonic() + 10
        while spool.exists() and os.listdir(spool) and time.monotonic() < deadline:
            time.sleep(0.1)
        r["spool_files_after"] = len(os.listdir(spool)) if spool.exists() else 0
        return r
    finally:
        relay.stop()


def scenario7a_postfix(workdir: Path, sink: Sink, clients: int, size: int, settle: float) -> dict:
    pf = Postfix(workdir, sink)
    try:
        return large_burst(pf.port, pf.master_pid, sink, clients, size, settle)
    finally:
        pf.stop()


def scenario7b(port: int, pid: int, sink: Sink, messages: int, size: int, relay: RelayInstance | None = None) -> dict:
    cpu0 = tree_cpu(pid)
    acc, e2e = run_smtp_source(port, sink, messages, 20, size, relay)
    cpu = tree_cpu(pid) - cpu0
    return {"accepted_per_s": acc, "end_to_end_per_s": e2e, "cpu_ms_per_msg": cpu / messages * 1000,
            "source_cpu_ms_per_msg": SOURCE_CPU["s"] / messages * 1000}


def scenario7b_relay(workdir: Path, sink: Sink, messages: int, size: int) -> dict:
    relay = start_relay(workdir, sink, trusted=True, dkim=False)
    try:
        return scenario7b(relay.port, relay.proc.pid, sink, messages, size, relay)
    finally:
        relay.stop()


def scenario7b_postfix(workdir: Path, sink: Sink, messages: int, size: int) -> dict:
    pf = Postfix(workdir, sink)
    try:
        pid = pf.master_pid()
        assert pid is not None
        return scenario7b(pf.port, pid, sink, messages, size)
    finally:
        pf.stop()


def _median_line(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return f"{key} -"
    return f"{key} {fmt(statistics.median(vals))} [{fmt(min(vals))}-{fmt(max(vals))}]"


def scenario5(workdir: Path, sink: Sink, n: int) -> dict:
    relay = start_relay(workdir, sink)
    try:
        return asyncio.run(_idle(relay.port, n, relay.proc.pid))
    finally:
        relay.stop()


def fsyncs_per_message(workdir: Path, sink: Sink, messages: int) -> float | None:
    """Count fsync/fdatasync syscalls with strace while 20 clients submit."""
    if not shutil.which("strace"):
        return None
    relay = start_relay(workdir, sink)
    try:
        out = workdir / "strace.txt"
        # -p for every existing thread of both processes (-f follows the ones started later, such
        # as the queue's writer thread, made at the first commit).
        tids = [a for pid in family(relay.proc.pid) for t in os.listdir(f"/proc/{pid}/task") for a in ("-p", t)]
        tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out), *tids],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1)
        res = asyncio.run(submit_load(relay.port, clients=20, messages=messages, per_session=10, size=10240,
                                      time_limit=120))
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        calls = sum(int(m.group(1)) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync",
                                                          out.read_text(), re.M))
        return calls / res["accepted"] if res["accepted"] else None
    finally:
        relay.stop()


# ---------------------------------------------------------------- scenario 8: an admin watching the queue

class QueueWatcher:
    """One admin session in a thread: log in, then GET /queue once a second until stopped."""

    def __init__(self, port: int, name: str, password: str) -> None:
        import http.client
        self.port, self.reloads, self.errors = port, 0, 0
        self.page_s: list[float] = []
        self._stop = threading.Event()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/login", f"username={name}&password={password.replace(' ', '+')}",
                     {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"})
        r = conn.getresponse()
        r.read()
        conn.close()
        m = re.search(r"__Host-relay_admin=([^;]+)", r.getheader("Set-Cookie") or "")
        if r.status != 303 or not m:
            raise RuntimeError(f"admin login failed: {r.status}")
        self.cookie = m.group(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import http.client
        for _ in range(3600):  # bounded: an hour of reloads at most
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                t0 = time.monotonic()
                conn.request("GET", "/queue?state=all", headers={"Cookie": f"__Host-relay_admin={self.cookie}"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.reloads += 1
                    self.page_s.append(time.monotonic() - t0)
                else:
                    self.errors += 1
            except OSError:
                self.errors += 1
            finally:
                conn.close()
            if self._stop.wait(1.0):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def scenario8_relay(workdir: Path, sink: Sink, messages: int, admin: bool) -> dict:
    extra = {"admin": {"listen": "127.0.0.1:0"}} if admin else None
    relay = start_relay(workdir, sink, trusted=True, dkim=False, extra=extra)
    watcher = None
    try:
        if admin:
            relay.cli("admin", "add", "bench", "--password-stdin", input=PASSWORD + "\n", check=True)
            watcher = QueueWatcher(relay.ports["admin"], "bench", PASSWORD)
        pids = family(relay.proc.pid)
        cpu0 = family_cpu(pids)
        acc, e2e = run_smtp_source(relay.port, sink, messages, 20, 10240, relay)
        cpu = family_cpu(pids) - cpu0
        out = {"accepted_per_s": acc, "end_to_end_per_s": e2e, "cpu_s_per_1000": cpu / messages * 1000}
        if watcher is not None:
            watcher.stop()
            out.update(queue_reloads=watcher.reloads, reload_errors=watcher.errors,
                       page_ms_p50=pct(watcher.page_s, 50) * 1000 if watcher.page_s else None)
        return out
    finally:
        if watcher is not None:
            watcher.stop()
        relay.stop()


# ---------------------------------------------------------------- scenario 6: hostile destination

TARPIT_RCPT = "bob@tarpit.example"
HEALTHY_RCPT = "alice@healthy.example"


def hostile_message(subject: str, rcpt: str) -> bytes:
    return (f"From: <{USER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}.{time.time_ns()}@bench.example>\r\n\r\n").encode() + b"X" * 76 + b"\r\n"


async def _plain_session(port: int, rcpt: str, subjects: list[str], acks: dict[str, float],
                         pace: float | None = None, start: float | None = None) -> None:
    """One trusted-network session (no TLS, no AUTH), MAIL/RCPT/DATA pipelined; records the time of
    each 250 to the dot. With `pace`, message i is sent no earlier than start + i * pace (open loop)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(r, b"220")
        w.write(b"EHLO bench.client\r\n")
        await _expect(r, b"250")
        for i, subject in enumerate(subjects):
            if pace is not None and start is not None:
                delay = start + i * pace - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            w.write(f"MAIL FROM:<{USER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
            await _expect(r, b"250")
            await _expect(r, b"250")
            await _expect(r, b"354")
            w.write(hostile_message(subject, rcpt) + b".\r\n")
            await _expect(r, b"250")
            acks[subject] = time.monotonic()
        w.write(b"QUIT\r\n")
        await _reply(r)
    finally:
        w.close()


async def _backlog(port: int, n: int, clients: int = 10) -> dict[str, float]:
    acks: dict[str, float] = {}
    subjects = [f"tarpit-{i}" for i in range(n)]

    async def client(mine: list[str]) -> None:
        for j in range(0, len(mine), 250):  # limits.max_commands (1000) counts per session
            await _plain_session(port, TARPIT_RCPT, mine[j:j + 250], acks)

    await asyncio.gather(*(client(subjects[k::clients]) for k in range(clients)))
    return acks


async def _steady_flow(port: int, rate: float, seconds: float, rep: int) -> dict[str, float]:
    """`rate` msgs/s for `seconds`, open loop, spread over sessions of at most 250 messages (each paced
    at rate/sessions; limits.max_commands counts per session)."""
    acks: dict[str, float] = {}
    total = int(rate * seconds)
    sessions = max(4, -(-total // 250))
    subjects = [f"healthy-{rep}-{i}" for i in range(total)]
    start = time.monotonic()
    await asyncio.gather(*(_plain_session(port, HEALTHY_RCPT, subjects[k::sessions], acks, pace=sessions / rate,
                                          start=start + k / rate) for k in range(sessions)))
    return acks


def scenario6_relay(workdir: Path, backlog: int, rate: float, seconds: float, rep: int) -> dict:
    """A backlog of `backlog` messages to a tarpit that stalls at RCPT, then a steady flow to a healthy
    domain: the healthy flow's latency (its 250 at submission -> the whole dot at the healthy MX) and
    throughput, and the most connections the tarpit saw at once. Default relay config otherwise
    (max_connections_per_destination 5, command_timeout 120): only the MX port and DNS are set."""
    from tests.support.dns_server import DNSServer
    from tests.support.hostile_mx import HostileMX, free_port_on

    port = free_port_on(["127.0.0.1", "127.0.0.2"])
    with DNSServer({}) as dns, HostileMX(host="127.0.0.2", port=port, hostname="tarpit.example") as tarpit, \
            HostileMX(host="127.0.0.1", port=port, hostname="healthy.example", rcvbuf=None) as healthy:
        tarpit.stall_at = {"RCPT"}
        for domain, addr in (("tarpit.example", "127.0.0.2"), ("healthy.example", "127.0.0.1"),
                             ("bench.example", "127.0.0.1")):
            dns.set(f"mx.{domain}", "A", [addr])
            dns.set(domain, "MX", [f"10 mx.{domain}."])
        # (start_relay's smarthost settings go unused in MX mode.)
        relay = start_relay(workdir, healthy, trusted=True, dkim=False, extra={
            "delivery": {"mode": "mx", "mx_port": port, "max_connections_per_destination": 5},
            "dns": {"nameservers": [dns.address], "timeout": 5}})
        try:
            t0 = time.monotonic()
            acks = asyncio.run(_backlog(relay.port, backlog))
            backlog_s = time.monotonic() - t0
            deadline = time.monotonic() + 30
            while tarpit.active == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            flow = asyncio.run(_steady_flow(relay.port, rate, seconds, rep))
            flow_end = time.monotonic()
            healthy.wait_until(lambda: len(healthy.messages) >= len(flow), timeout=60)
            arrived: dict[str, float] = {}
            dup = 0
            for m in list(healthy.messages):
                if m.subject in arrived:
                    dup += 1
                else:
                    arrived[m.subject] = m.completed_at
            lat = [arrived[s] - t for s, t in flow.items() if s in arrived]
            last = max(arrived.values()) if arrived else None
            first_submit = min(flow.values()) if flow else None
            return {
                "backlog": len(acks), "backlog_submit_s": backlog_s, "healthy_sent": len(flow),
                "healthy_delivered": len(lat), "healthy_duplicates": dup,
                "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "max_ms": max(lat) * 1000 if lat else None,
                "healthy_per_s": len(lat) / (last - first_submit) if lat and last > first_submit else None,
                "drain_after_flow_s": (last - flow_end) if last else None,
                "tarpit_max_concurrent": tarpit.max_active, "tarpit_connections": tarpit.connections,
                "tarpit_completed": len(tarpit.messages),
            }
        finally:
            relay.stop()


def print_scenario6(label: str, runs: list[dict], cmd: str) -> None:
    def agg(key: str) -> str:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            return "-"
        return f"{fmt(statistics.median(vals))} [{fmt(min(vals))}-{fmt(max(vals))}]"

    print(f"[6] {label:<8} {cmd}")
    print(f"[6] {label:<8} healthy latency p50 {agg('p50_ms')} ms, p99 {agg('p99_ms')} ms, max {agg('max_ms')} ms; "
          f"throughput {agg('healthy_per_s')} msgs/s; delivered {agg('healthy_delivered')} of "
          f"{agg('healthy_sent')}, duplicates {agg('healthy_duplicates')}; tarpit max concurrent "
          f"{agg('tarpit_max_concurrent')}, connections {agg('tarpit_connections')}, completed "
          f"{agg('tarpit_completed')}; backlog of {agg('backlog')} queued in {agg('backlog_submit_s')} s")
    for i, r in enumerate(runs):
        problems = []
        if r["healthy_delivered"] != r["healthy_sent"]:
            problems.append(f"{r['healthy_sent'] - r['healthy_delivered']} healthy messages not delivered")
        if r["healthy_duplicates"]:
            problems.append(f"{r['healthy_duplicates']} duplicate(s) at the healthy sink")
        if r["tarpit_completed"]:
            problems.append(f"the tarpit completed {r['tarpit_completed']} message(s)")
        if problems:
            print(f"[6] {label:<8} rep {i + 1}: CHECK FAILED: " + "; ".join(problems))


# ---------------------------------------------------------------- scenario 9: the authenticated path

def auth_cell(port: int, sink: Sink, cpu_of, *, messages: int, clients: int, size: int, tls: str,
              relay: RelayInstance | None = None) -> dict:
    """bench/authload.py against `port`; `cpu_of()` is the MTA's CPU so far (all its processes)."""
    base = sink.count
    if relay is not None:
        relay.log_paused.set()
    try:
        cpu0 = cpu_of()
        res = authload.run_load(port, clients=clients, messages=messages, size=size, user=USER,
                                password=PASSWORD, rcpt=RCPT, tls=tls, time_limit=300)
        n = res["accepted"]
        end = sink.wait_for(base + n, timeout=120)
        end_wall = time.time() - (time.monotonic() - end) if end else None
        # A moment for anything still running (the relay settling, Postfix's qmgr) to be counted.
        time.sleep(0.2)
        cpu = cpu_of() - cpu0
    finally:
        if relay is not None:
            relay.log_paused.clear()
    lat = res["latencies"]
    return {
        "accepted": n, "errors": res["errors"], "sink_received": sink.count - base,
        "accepted_per_s": n / res["seconds"] if res["seconds"] else None,
        "end_to_end_per_s": n / (end_wall - res["start"]) if end_wall and n else None,
        "data_p50_ms": authload.percentile(lat, 50) * 1000, "data_p99_ms": authload.percentile(lat, 99) * 1000,
        "cpu_ms_per_msg": cpu / n * 1000 if n else None,
        "client_cpu_ms_per_msg": res["client_cpu_s"] / n * 1000 if n else None,
        # The load generator's share of the machine while it ran (2.0 would be both cores).
        "client_cores": res["client_cpu_s"] / res["seconds"] if res["seconds"] else None,
        # Of its wall time, how much one client process spent on the CPU: far below 1, every client
        # is waiting on the server, not on itself.
        "client_busy": res["client_cpu_s"] / (clients * res["seconds"]) if res["seconds"] else None,
        "tls": "/".join(res["tls_versions"]), "first_error": res["first_error"] or None,
    }


def scenario9_relay(workdir: Path, sink: Sink, **kw) -> dict:
    # Not trusted: the relay requires AUTH, like the Postfix it is measured against. No DKIM key
    # (this Postfix signs nothing): the same work on both sides.
    relay = start_relay(workdir, sink, dkim=False)
    try:
        pids = family(relay.proc.pid)
        return auth_cell(relay.port, sink, lambda: family_cpu(pids), relay=relay, **kw)
    finally:
        relay.stop()


def scenario9_postfix(workdir: Path, sink: Sink, **kw) -> dict:
    pf = Postfix(workdir, sink, auth=True)
    try:
        pid = pf.master_pid()
        assert pid is not None
        return auth_cell(pf.port, sink, lambda: tree_cpu(pid), **kw)
    finally:
        pf.stop()


def check_counts(tag: str, label: str, i: int, r: dict, expected: int | None = None) -> None:
    """The sink must have received exactly what was accepted (and, given, what was sent)."""
    accepted = r.get("accepted", expected)
    problems = []
    if r.get("sink_received") is not None and r["sink_received"] != accepted:
        problems.append(f"sink received {r['sink_received']}, {accepted} accepted")
    if expected is not None and accepted != expected:
        problems.append(f"{accepted} of {expected} accepted")
    if r.get("errors"):
        problems.append(f"{r['errors']} client errors (first: {r.get('first_error')})")
    if problems:
        print(f"[{tag}] rep {i + 1} {label}: CHECK FAILED: " + "; ".join(problems))


# ---------------------------------------------------------------- main

def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return str(v)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="1,2,3,4,5,6")
    p.add_argument("--messages", type=int, default=2000, help="messages per submission run (scenario 1/3)")
    p.add_argument("--source-messages", type=int, default=5000, help="smtp-source messages (scenario 2)")
    p.add_argument("--queue-scale", type=int, default=100_000, help="messages for scenario 4")
    p.add_argument("--idle", type=int, default=1000, help="idle connections for scenario 5")
    p.add_argument("--repeat", type=int, default=3, help="repetitions for scenario 2 (median, min-max)")
    p.add_argument("--hostile-backlog", type=int, default=2400, help="tarpit backlog for scenario 6")
    p.add_argument("--hostile-rate", type=float, default=20.0, help="healthy msgs/s for scenario 6")
    p.add_argument("--hostile-seconds", type=float, default=30.0, help="length of the healthy flow (scenario 6)")
    p.add_argument("--hostile-repeat", type=int, default=3, help="repetitions of scenario 6 (median [min-max])")
    p.add_argument("--large-clients", type=int, default=50, help="scenario 7a: concurrent large messages")
    p.add_argument("--large-size", type=int, default=10_000_000, help="scenario 7a: bytes a message")
    p.add_argument("--large-settle", type=float, default=60.0, help="scenario 7a: seconds watched after the burst")
    p.add_argument("--mb-messages", type=int, default=500, help="scenario 7b: 1 MB messages a run")
    p.add_argument("--large-repeat", type=int, default=3, help="repetitions of scenario 7 (median [min-max])")
    p.add_argument("--large-dkim", action="store_true", help="scenario 7a: also the relay signing DKIM")
    p.add_argument("--auth-messages", type=int, default=3000, help="scenario 9: messages a run")
    p.add_argument("--auth-clients", type=int, default=20, help="scenario 9: concurrent clients (processes)")
    p.add_argument("--auth-tls", default="1.3,1.2", help="scenario 9: client TLS versions, each a cell")
    p.add_argument("--compare-postfix", action="store_true")
    p.add_argument("--acceptance-workers", type=int, default=None,
                   help="server.acceptance_workers for every relay started (default: the relay's own, 1)")
    p.add_argument("--event-loop", choices=("uvloop", "asyncio"), default=None,
                   help="server.event_loop for every relay started (default: the relay's own, uvloop)")
    p.add_argument("--json", help="also write results to this file")
    args = p.parse_args()
    if args.acceptance_workers is not None:
        RELAY_SERVER["acceptance_workers"] = args.acceptance_workers
    if args.event_loop is not None:
        RELAY_SERVER["event_loop"] = args.event_loop
    raise_nofile()
    scen = {int(s) for s in args.scenarios.split(",") if s}
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    tmp.chmod(0o755)  # Postfix's unprivileged daemons must reach their spool below it
    cells: list[Cell] = []  # issue 16's table, printed at the end
    sink = Sink()
    results["sink"] = sink.kind
    print(f"sink: {sink.kind} on 127.0.0.1:{sink.port}; work dir {tmp}")
    try:
        if 1 in scen:
            rows = []
            for per in (1, 50):
                r = run_submission(tmp / f"s1-{per}", sink, clients=20, messages=args.messages, per_session=per,
                                   size=10240)
                rows.append(r)
                print(f"[1] 20 clients, 10 KB, {per} msg/session: " + ", ".join(
                    f"{k}={fmt(v)}" for k, v in r.items() if k not in ("clients", "size", "per_session")))
            fs = fsyncs_per_message(tmp / "s1-strace", sink, min(args.messages, 1000))
            print(f"[1] fsync+fdatasync per accepted message (strace, 20 clients): {fmt(fs)}")
            results["scenario1"] = {"runs": rows, "fsyncs_per_message": fs}
        if 2 in scen:
            if not shutil.which("smtp-source"):
                print("[2] skipped: smtp-source not installed (Debian package postfix)")
            else:
                # Like for like with Postfix (which signs nothing without a milter): no DKIM key.
                # The same with signing follows, for what a DKIM-signing relay costs. Interleaved
                # rep by rep (relay, relay+dkim, postfix, then again), so a noisy machine hits
                # every system alike; per-rep ratios printed.
                pf_ok = args.compare_postfix and shutil.which("postfix")
                if args.compare_postfix and not pf_ok:
                    print("[2] --compare-postfix: postfix not installed")
                kinds = ["relay", "relay+dkim"] + (["postfix"] if pf_ok else [])
                cmd = f"bench/run.py --scenarios 2 --source-messages {args.source_messages} --repeat {args.repeat}" + \
                    (" --compare-postfix" if args.compare_postfix else "")
                print(f"[2] {cmd}")
                kinds.append("ceiling")  # smtp-source straight into smtp-sink: what loopback allows
                runs2: dict[str, list[dict]] = {k: [] for k in kinds}
                for i in range(args.repeat):
                    for k in kinds:
                        wd = tmp / f"s2-{k}-{i}"
                        r = (scenario2_postfix(wd, sink, args.source_messages) if k == "postfix" else
                             scenario2_ceiling(sink, args.source_messages) if k == "ceiling" else
                             scenario2_relay(wd, sink, args.source_messages, dkim=k == "relay+dkim"))
                        runs2[k].append(r)
                        print(f"[2] rep {i + 1} {k}: " + ", ".join(f"{x}={fmt(v)}" for x, v in r.items()))
                        check_counts("2", k, i, r, args.source_messages)
                for k, rs in runs2.items():
                    results["scenario2_" + k.replace("+", "_")] = rs
                    print("[2] {:<10} smtp-source -s 20 -m {} -l 10240: ".format(k, args.source_messages) + "; ".join(
                        _median_line(rs, key) for key in ("end_to_end_per_s", "accepted_per_s", "cpu_s_per_1000",
                                                          "source_cpu_s_per_1000")))
                if pf_ok:
                    for k in ("relay", "relay+dkim"):
                        ratios = [a["end_to_end_per_s"] / b["end_to_end_per_s"] for a, b in zip(runs2[k], runs2["postfix"])
                                  if a["end_to_end_per_s"] and b["end_to_end_per_s"]]
                        if ratios:
                            results[f"scenario2_ratio_{k.replace('+', '_')}"] = ratios
                            print(f"[2] end-to-end ratio {k}/postfix per rep: " + ", ".join(f"{x:.2f}" for x in ratios)
                                  + f"; median {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
                src = f"smtp-source -s 20 -m {args.source_messages} -l 10240"
                e2e = {k: [r["end_to_end_per_s"] for r in rs] for k, rs in runs2.items()}
                pf_e2e = e2e.get("postfix", [])
                cells.append(Cell(f"`{src}`, trusted path, end to end, relay without DKIM", cmd,
                                  relay=e2e["relay"], postfix=pf_e2e))
                cells.append(Cell("same, relay signing DKIM RSA-2048 (Postfix does not sign)", cmd,
                                  relay=e2e["relay+dkim"], postfix=pf_e2e))
                cells.append(Cell("loopback ceiling, smtp-source straight into smtp-sink", cmd,
                                  relay=e2e["ceiling"], note="not an MTA: the harness's own limit"))
        if 3 in scen:
            rows = []
            for size in (1024, 10240, 102400):
                for clients in (1, 20, 100):
                    n = max(200, args.messages // (4 if size >= 102400 else 1))
                    r = run_submission(tmp / f"s3-{size}-{clients}", sink, clients=clients, messages=n,
                                       per_session=1, size=size)
                    rows.append(r)
                    print(f"[3] {size // 1024:>3} KB x {clients:>3} clients: accepted/s {fmt(r['accepted_per_s'])}, "
                          f"e2e/s {fmt(r['end_to_end_per_s'])}, p50/p95/p99 ms {fmt(r['p50_ms'])}/{fmt(r['p95_ms'])}/"
                          f"{fmt(r['p99_ms'])}, cpu s/1000 {fmt(r['cpu_s_per_1000'])}, rss {fmt(r['peak_rss_mb'])} MB")
            results["scenario3"] = rows
        if 4 in scen:
            r = scenario4(tmp, args.queue_scale)
            results["scenario4"] = r
            print("[4] queue scale: " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
        if 5 in scen:
            r = scenario5(tmp / "s5", sink, args.idle)
            results["scenario5"] = r
            print("[5] idle connections: " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
        if 6 in scen:
            cmd = (f"bench/run.py --scenarios 6 --hostile-backlog {args.hostile_backlog} --hostile-rate "
                   f"{args.hostile_rate:g} --hostile-seconds {args.hostile_seconds:g} --hostile-repeat "
                   f"{args.hostile_repeat}")
            runs: dict[str, list[dict]] = {"relay": []}
            if args.compare_postfix:
                # Postfix would need transport_maps for the two loopback MX hosts (it cannot use our DNS
                # server's port) and a tarpit-aware comparison; not built yet.
                print("[6] --compare-postfix: no Postfix run for this scenario yet (relay only)")
            for i in range(args.hostile_repeat):  # reps interleaved with any other implementation's
                r = scenario6_relay(tmp / f"s6-relay-{i}", args.hostile_backlog, args.hostile_rate,
                                    args.hostile_seconds, i)
                runs["relay"].append(r)
                print(f"[6] rep {i + 1} relay: " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
            results["scenario6"] = runs
            print_scenario6("relay", runs["relay"], cmd)
        if 8 in scen:
            if not shutil.which("smtp-source"):
                print("[8] skipped: smtp-source not installed (Debian package postfix)")
            else:
                cmd = f"bench/run.py --scenarios 8 --source-messages {args.source_messages} --repeat {args.repeat}"
                print(f"[8] {cmd}")
                runs8: dict[str, list[dict]] = {"admin_off": [], "admin_watching": []}
                for i in range(args.repeat):  # interleaved, the order swapped each rep (no order effect)
                    for label in (("admin_off", "admin_watching") if i % 2 == 0 else ("admin_watching", "admin_off")):
                        r = scenario8_relay(tmp / f"s8-{label}-{i}", sink, args.source_messages,
                                            admin=label == "admin_watching")
                        runs8[label].append(r)
                        print(f"[8] rep {i + 1} {label}: " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
                results["scenario8"] = runs8
                med = {k: statistics.median(r["end_to_end_per_s"] for r in v if r["end_to_end_per_s"])
                       for k, v in runs8.items()}
                acc8 = {k: statistics.median(r["accepted_per_s"] for r in v) for k, v in runs8.items()}
                ratio8 = med["admin_watching"] / med["admin_off"]
                results["scenario8_ratio_end_to_end"] = ratio8
                print(f"[8] end-to-end msgs/s median: admin off {fmt(med['admin_off'])}, admin watching "
                      f"{fmt(med['admin_watching'])} ({(ratio8 - 1) * 100:+.1f} %); accepted/s "
                      f"{fmt(acc8['admin_off'])} vs {fmt(acc8['admin_watching'])} "
                      f"({(acc8['admin_watching'] / acc8['admin_off'] - 1) * 100:+.1f} %)")
        if 9 in scen:
            pf_ok = args.compare_postfix and shutil.which("postfix") and shutil.which("saslpasswd2")
            if args.compare_postfix and not pf_ok:
                print("[9] --compare-postfix: postfix or saslpasswd2 (sasl2-bin) not installed")
            cmd = (f"bench/run.py --scenarios 9 --auth-messages {args.auth_messages} --auth-clients "
                   f"{args.auth_clients} --auth-tls {args.auth_tls} --repeat {args.repeat}"
                   + (" --compare-postfix" if args.compare_postfix else ""))
            print(f"[9] {cmd}")
            tlss = [t.strip() for t in args.auth_tls.split(",") if t.strip()]
            kinds9 = ["relay"] + (["postfix"] if pf_ok else [])
            runs9: dict[str, dict[str, list[dict]]] = {t: {k: [] for k in kinds9} for t in tlss}
            kw = {"messages": args.auth_messages, "clients": args.auth_clients, "size": 10240}
            for i in range(args.repeat):  # interleaved: relay, Postfix, relay, Postfix ...
                for t in tlss:
                    for k in kinds9:
                        wd = tmp / f"s9-{k}-tls{t}-{i}"
                        r = (scenario9_postfix if k == "postfix" else scenario9_relay)(wd, sink, tls=t, **kw)
                        runs9[t][k].append(r)
                        print(f"[9] rep {i + 1} TLS {t} cap, {k}: " + ", ".join(f"{x}={fmt(v)}" for x, v in r.items()))
                        check_counts("9", f"TLS {t} {k}", i, r, args.auth_messages)
                        want = "TLSv1.2" if t == "1.2" else "TLSv1.3"
                        if r["tls"] != want:
                            print(f"[9] rep {i + 1} TLS {t} {k}: CHECK FAILED: negotiated {r['tls']}, wanted {want}")
            for t in tlss:
                for k, rs in runs9[t].items():
                    print(f"[9] TLS {t} {k:<8}: " + "; ".join(_median_line(rs, key) for key in (
                        "end_to_end_per_s", "accepted_per_s", "data_p50_ms", "data_p99_ms", "cpu_ms_per_msg",
                        "client_cpu_ms_per_msg", "client_cores", "client_busy")))
                rr, pr = runs9[t]["relay"], runs9[t].get("postfix", [])
                label = "TLS 1.3" if t == "1.3" else "client capped at TLS 1.2"
                cells.append(Cell(f"STARTTLS + AUTH PLAIN, c={args.auth_clients}, 10 KB, new connection per "
                                  f"message, {label}, end to end", cmd,
                                  relay=[r["end_to_end_per_s"] for r in rr],
                                  postfix=[r["end_to_end_per_s"] for r in pr]))
                cells.append(Cell(f"DATA -> 250 p99, same cell ({label})", cmd, unit="ms", digits=1,
                                  higher_is_better=False, relay=[r["data_p99_ms"] for r in rr],
                                  postfix=[r["data_p99_ms"] for r in pr]))
                cells.append(Cell(f"DATA -> 250 p50, same cell ({label})", cmd, unit="ms", digits=1,
                                  higher_is_better=False, relay=[r["data_p50_ms"] for r in rr],
                                  postfix=[r["data_p50_ms"] for r in pr]))
                cells.append(Cell(f"MTA CPU-ms a message, same cell ({label})", cmd, unit="ms", digits=2,
                                  higher_is_better=False, relay=[r["cpu_ms_per_msg"] for r in rr],
                                  postfix=[r["cpu_ms_per_msg"] for r in pr]))
                cells.append(Cell(f"load generator's own CPU-ms a message ({label}; relay column: against "
                                  "the relay)", cmd, unit="ms", digits=2,
                                  relay=[r["client_cpu_ms_per_msg"] for r in rr],
                                  postfix=[r["client_cpu_ms_per_msg"] for r in pr], compare=False,
                                  note="the client's cost, not a comparison"))
            results["scenario9"] = {"runs": runs9, "command": cmd}
        if 7 in scen:
            cmd = (f"bench/run.py --scenarios 7 --large-clients {args.large_clients} --large-size {args.large_size} "
                   f"--large-settle {args.large_settle:g} --mb-messages {args.mb_messages} --large-repeat "
                   f"{args.large_repeat}" + (" --large-dkim" if args.large_dkim else "")
                   + (" --compare-postfix" if args.compare_postfix else ""))
            print(f"[7] {cmd}")
            pf_ok = args.compare_postfix and shutil.which("postfix") and shutil.which("smtp-source")
            kinds = ["relay"] + (["relay+dkim"] if args.large_dkim else []) + (["postfix"] if pf_ok else [])
            a_runs: dict[str, list[dict]] = {k: [] for k in kinds}
            b_runs: dict[str, list[dict]] = {k: [] for k in kinds if k != "relay+dkim"}
            for i in range(args.large_repeat):  # interleaved: each rep runs every MTA once
                for k in kinds:
                    wd = tmp / f"s7a-{k}-{i}"
                    if k == "postfix":
                        r = scenario7a_postfix(wd, sink, args.large_clients, args.large_size, args.large_settle)
                    else:
                        r = scenario7a_relay(wd, sink, args.large_clients, args.large_size, args.large_settle,
                                             dkim=k == "relay+dkim")
                    a_runs[k].append(r)
                    print(f"[7a] rep {i + 1} {k}: " + ", ".join(f"{x}={fmt(v)}" for x, v in r.items()))
                for k in b_runs:
                    wd = tmp / f"s7b-{k}-{i}"
                    r = (scenario7b_postfix if k == "postfix" else scenario7b_relay)(
                        wd, sink, args.mb_messages, 1_048_576)
                    b_runs[k].append(r)
                    print(f"[7b] rep {i + 1} {k}: " + ", ".join(f"{x}={fmt(v)}" for x, v in r.items()))
            for k, runs7 in a_runs.items():
                print(f"[7a] {k:<10} {args.large_clients} x {args.large_size} B at once: " + "; ".join(
                    _median_line(runs7, key) for key in ("peak_pss_mb", "start_pss_mb", "pss_end_mb",
                                                         "back_within_50mb_s", "seconds", "delivered")))
            for k, runs7 in b_runs.items():
                print(f"[7b] {k:<10} smtp-source -s 20 -m {args.mb_messages} -l 1048576: " + "; ".join(
                    _median_line(runs7, key) for key in ("end_to_end_per_s", "accepted_per_s", "cpu_ms_per_msg",
                                                         "source_cpu_ms_per_msg")))
            results["scenario7"] = {"burst": a_runs, "one_mb": b_runs, "command": cmd}
        if cells:
            print("\n## issue 16 cells (one run, interleaved rep by rep; median [min-max] of "
                  f"{args.repeat}; ratio = relay/Postfix of the same rep)\n")
            print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
                  f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"run: bench/run.py {' '.join(sys.argv[1:])}\n")
            print(table(cells))
            results["cells"] = [vars(c) for c in cells]
    finally:
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
