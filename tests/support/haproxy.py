"""Debian's HAProxy as a real load balancer in front of the relay: TCP mode, PROXY v2 (or v1) to
the backends, the 220/QUIT/221 health check with check-send-proxy (scale-out.md section 3).

`HAProxy(frontends).start()` writes a config into a temp dir, runs `haproxy -f cfg -db` (in the
foreground, logging to stderr), waits until every backend server is UP on the stats socket and
stops it (SIGTERM, then SIGKILL) at `stop()`.
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Frontend:
    name: str
    listen_port: int          # on 127.0.0.1, where clients connect
    backend_port: int         # the relay's listener on 127.0.0.1
    proxy: str = "v2"         # "v2": send-proxy-v2, "v1": send-proxy
    tls: bool = False         # the backend speaks TLS from the first byte (465): the check does too


def config_text(frontends: list[Frontend], stats_socket: Path, check_inter: str = "500ms") -> str:
    """The haproxy.cfg the README's "Behind HAProxy" section shows, on loopback ports."""
    out = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client  10m",
        "    timeout server  10m",
        "    retries 2",
        "    option redispatch",
    ]
    for f in frontends:
        send = "send-proxy-v2" if f.proxy == "v2" else "send-proxy"
        check_tls = " check-ssl verify none" if f.tls else ""
        out += [
            f"frontend fe_{f.name}",
            f"    bind 127.0.0.1:{f.listen_port}",
            f"    default_backend be_{f.name}",
            f"backend be_{f.name}",
            "    balance leastconn",
            "    option tcp-check",
            "    tcp-check expect rstring ^220",
            "    tcp-check send QUIT\\r\\n",
            "    tcp-check expect rstring ^221",
            f"    default-server {send} check-send-proxy check inter {check_inter} fall 2 rise 1{check_tls} "
            "on-marked-down shutdown-sessions",
            f"    server relay1 127.0.0.1:{f.backend_port}",
        ]
    return "\n".join(out) + "\n"


class HAProxy:
    def __init__(self, workdir: Path, frontends: list[Frontend]):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.frontends = frontends
        self.stats = self.dir / "admin.sock"
        self.cfg = self.dir / "haproxy.cfg"
        self.cfg.write_text(config_text(frontends, self.stats))
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True, timeout=30)

    def start(self, timeout: float = 20) -> "HAProxy":
        self.proc = subprocess.Popen(["haproxy", "-f", str(self.cfg), "-db"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited:\n" + "\n".join(self.log[-20:]))
            try:
                if all(s == "UP" for s in self.server_states().values()) and \
                        len(self.server_states()) == len(self.frontends):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("haproxy backends not UP in time:\n" + "\n".join(self.log[-20:]))

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))

    def command(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(cmd.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def server_states(self) -> dict[str, str]:
        """backend name -> status of its server ("UP", "DOWN", "no check", ...)."""
        lines = self.command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("svname") not in ("FRONTEND", "BACKEND", None):
                out[row["pxname"]] = row["status"].split()[0] if row["status"] else ""
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "HAProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
