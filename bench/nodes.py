#!/usr/bin/env python3
"""Scale-out benchmark (issue 17): 1, 2 and 3 relay nodes on one PostgreSQL behind HAProxy
(PROXY v2, round robin), each node capped at the same CPU share with a cgroup (v1 `cpu`
controller, cfs quota), and one SQLite node under the same cap and the same HAProxy in the same
run. Configurations are interleaved rep by rep (sqlite-1, pg-1, pg-2, pg-3, then again), each rep
on a fresh database; the sink's count is checked against what smtp-source sent.

    python bench/nodes.py --repeat 3 --messages 3000 --quota 25

Printed: end-to-end msgs/s (smtp-source's first byte to the sink's last message), the nodes' CPU
per message (acceptance + delivery processes of every node), the per-rep speed-up against pg-1,
median [min-max], and the command. Needs root (cgroups), PostgreSQL, HAProxy and Postfix's
smtp-source/smtp-sink; all traffic on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import RCPT, USER, Sink, family, family_cpu, free_port, raise_nofile  # noqa: E402
from tests.support.postgres import PostgresServer, binaries  # noqa: E402
from tests.support.relay_instance import RelayInstance  # noqa: E402

CGROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


class CpuCap:
    """One cgroup per node with cpu.cfs_quota_us = quota % of one core; removed at close."""

    def __init__(self, name: str, quota_pct: int):
        self.path = CGROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(PERIOD_US * quota_pct // 100))

    def add(self, pids: list[int]) -> None:
        for pid in pids:
            (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                (CGROOT / "cgroup.procs").write_text(pid)
            self.path.rmdir()
        except OSError:
            pass


class HAProxy:
    def __init__(self, workdir: Path, ports: list[int]):
        self.port = free_port()
        cfg = workdir / "haproxy.cfg"
        lines = ["global", "    maxconn 4000", "defaults", "    mode tcp", "    timeout connect 5s",
                 "    timeout client 5m", "    timeout server 5m", f"frontend smtp", f"    bind 127.0.0.1:{self.port}",
                 "    default_backend relays", "backend relays", "    balance roundrobin"]
        lines += [f"    server n{i} 127.0.0.1:{p} send-proxy-v2" for i, p in enumerate(ports)]
        cfg.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        import socket
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("haproxy did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def node_config(sink: Sink, name: str, dsn: str | None, nodes: int = 1) -> dict:
    cfg: dict = {
        "server": {"node_id": name},
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "starttls", "proxy_protocol": True,
                       "trusted_proxies": ["127.0.0.1/32"]}],
        "delivery": {"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none"},
                     # A limit for the whole cluster on PostgreSQL (shared slots): 20 a node here,
                     # so the receiver's limit is never what caps the scaling measured.
                     "max_connections_per_destination": 20 * nodes},
        "limits": {"connections_per_ip": 5000, "connections": 5000},
        "trusted_networks": [{"network": "127.0.0.0/8", "domains": ["bench.example"]}],
    }
    if dsn:
        cfg["storage"] = {"backend": "postgres", "dsn": dsn, "pool_size": 10}
    return cfg


def one_run(workdir: Path, sink: Sink, pg: PostgresServer, backend: str, nodes: int, messages: int,
            sessions: int, quota: int, rep: int) -> dict:
    dsn = asyncio.run(pg.new_database()) if backend == "postgres" else None
    relays: list[RelayInstance] = []
    caps: list[CpuCap] = []
    proxy = None
    try:
        for i in range(nodes):
            r = RelayInstance(workdir / f"{backend}{nodes}-r{rep}-n{i}", config=node_config(sink, f"node{i + 1}", dsn, nodes),
                              log_to_file=True)
            if i == 0:  # one database for every PostgreSQL node: the domain is added once
                r.cli("domain", "add", USER.rpartition("@")[2], "--no-dkim", check=True)
            relays.append(r.start())
        for i, r in enumerate(relays):
            cap = CpuCap(f"relaybench-{os.getpid()}-{i}", quota)
            caps.append(cap)
            cap.add(family(r.proc.pid))
        proxy = HAProxy(workdir, [r.ports["proxy_starttls"] for r in relays])
        pids = [p for r in relays for p in family(r.proc.pid)]
        for r in relays:
            r.log_paused.set()
        cpu0 = family_cpu(pids)
        base = sink.count
        t0 = time.monotonic()
        subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "10240", "-f", USER,
                        "-t", RCPT, f"127.0.0.1:{proxy.port}"], check=True, timeout=600, stdout=subprocess.DEVNULL)
        end = sink.wait_for(base + messages, timeout=600)
        cpu = family_cpu(pids) - cpu0
        got = sink.count - base
        if end is None or got != messages:
            raise RuntimeError(f"{backend}-{nodes}: the sink has {got} of {messages}")
        time.sleep(0.5)
        if sink.count - base != messages:
            raise RuntimeError(f"{backend}-{nodes}: the sink has {sink.count - base} of {messages} (duplicates)")
        return {"e2e": messages / (end - t0), "cpu_ms": cpu / messages * 1000}
    finally:
        if proxy is not None:
            proxy.stop()
        for r in relays:
            r.log_paused.clear()
            r.stop()
        for c in caps:
            c.close()


def med(values: list[float], f: str = "{:.0f}") -> str:
    return f"{f.format(statistics.median(values))} [{f.format(min(values))}-{f.format(max(values))}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2,3", help="PostgreSQL node counts (default 1,2,3)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=30, help="smtp-source sessions in parallel")
    ap.add_argument("--quota", type=int, default=25, help="each node's CPU cap, %% of one core")
    ap.add_argument("--no-sqlite", action="store_true", help="leave out the SQLite single node")
    ap.add_argument("--pg-no-fsync", action="store_true",
                    help="diagnosis only: PostgreSQL with fsync off (not what any figure may quote)")
    args = ap.parse_args()
    for tool in ("haproxy", "smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            print(f"bench/nodes.py: {tool} is not installed", file=sys.stderr)
            return 2
    if os.geteuid() != 0 or not CGROOT.is_dir():
        print("bench/nodes.py: needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu", file=sys.stderr)
        return 2
    bindir = binaries()
    if bindir is None:
        print("bench/nodes.py: PostgreSQL (initdb, pg_ctl) is not installed", file=sys.stderr)
        return 2
    raise_nofile()
    cells = ([("sqlite", 1)] if not args.no_sqlite else []) + [("postgres", int(n)) for n in args.nodes.split(",")]
    cmd = "python bench/nodes.py " + " ".join(sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="relay-nodes-"))
    os.chmod(workdir, 0o755)
    pg = PostgresServer(bindir, durable=not args.pg_no_fsync).start()
    sink = Sink()
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in cells}
    try:
        for rep in range(args.repeat):
            for backend, n in cells:
                res = one_run(workdir, sink, pg, backend, n, args.messages, args.sessions, args.quota, rep)
                results[(backend, n)].append(res)
                print(f"rep {rep + 1} {backend}-{n}: {res['e2e']:.0f} msgs/s end to end, "
                      f"{res['cpu_ms']:.2f} node CPU-ms/msg", flush=True)
    finally:
        sink.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n$ {cmd}\n{args.messages} x 10 KB per rep through HAProxy (PROXY v2), smtp-source -s {args.sessions}, "
          f"each node capped at {args.quota}% of a core; median [min-max] of {args.repeat} interleaved reps")
    print(f"{'cell':<14} {'msgs/s e2e':<20} {'node CPU-ms/msg':<20} vs postgres-1 (per rep)")
    base = results.get(("postgres", 1))
    for (backend, n), runs in results.items():
        ratio = ""
        if base:
            ratios = [r["e2e"] / b["e2e"] for r, b in zip(runs, base)]
            ratio = med(ratios, "{:.2f}")
        print(f"{backend + '-' + str(n):<14} {med([r['e2e'] for r in runs]):<20} "
              f"{med([r['cpu_ms'] for r in runs], '{:.2f}'):<20} {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
