"""Verified transfers: seeded streams whose sha256 both ends compute, through the lab.

Agents run inside the namespaces (``python -m shared.lab.transfers recv|send``): a receiver
hashes every connection until EOF and answers "n digest"; a sender runs one transfer per JSON
line on stdin. Any reordering, loss or corruption changes the digest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from shared.lab.commands import REPO_ROOT
from shared.lab.plumbing import netns_exec
from shared.lab.topology import Topology

CHUNK = 64 * 1024
RECV_PORT = 5998
#: a transfer whose connection moves no byte for this long counts as a lost connection
STALL_TIMEOUT = 60.0


def pattern(seed: int) -> memoryview:
    """2 MiB of seeded random bytes; a transfer's chunk k is a 64 KiB window into it, so any
    reordering, loss or corruption changes the sha256 of the stream."""
    block = random.Random(seed).randbytes(1 << 20)
    return memoryview(block + block)


def stream(seed: int, nbytes: int):
    """The chunks of transfer ``seed``: deterministic, so both ends can hash them."""
    pat = pattern(seed)
    sent, k = 0, 0
    while sent < nbytes:
        n = min(CHUNK, nbytes - sent)
        off = (k * 40_961) % (1 << 20)
        yield pat[off:off + n]
        sent += n
        k += 1


def serve_receiver(port: int) -> None:
    """Agent in a namespace: hash every connection's bytes until EOF, answer "n digest"."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    print("ready", flush=True)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(STALL_TIMEOUT * 2)
            h, n = hashlib.sha256(), 0
            try:
                while True:
                    b = conn.recv(1 << 16)
                    if not b:
                        break
                    h.update(b)
                    n += len(b)
                conn.sendall(f"{n} {h.hexdigest()}\n".encode())
            except OSError:
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def send_one(host: str, port: int, nbytes: int, seed: int) -> dict:
    """One verified transfer: send the seeded stream, compare the receiver's count and sha256
    with our own. Never raises: the result says what happened."""
    t0 = time.monotonic()
    h = hashlib.sha256()
    sent = 0
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.settimeout(STALL_TIMEOUT)
            for chunk in stream(seed, nbytes):
                s.sendall(chunk)
                h.update(chunk)
                sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while not reply.endswith(b"\n"):
                b = s.recv(256)
                if not b:
                    break
                reply += b
        n, digest = reply.decode().split()
        ok = int(n) == nbytes and digest == h.hexdigest()
        return {"ok": ok, "bytes": int(n), "lost": False, "corrupt": not ok,
                "seconds": round(time.monotonic() - t0, 3),
                "error": "" if ok else f"receiver got {n} bytes / {digest[:12]}"}
    except (OSError, ValueError) as e:
        return {"ok": False, "bytes": sent, "lost": True, "corrupt": False,
                "seconds": round(time.monotonic() - t0, 3), "error": f"{type(e).__name__}: {e}"}


def sender_agent() -> None:
    """Agent in a namespace: one JSON command per stdin line, one JSON result per line."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        print(json.dumps(send_one(cmd["host"], cmd["port"], cmd["bytes"], cmd["seed"])),
              flush=True)


@dataclass
class Agents:
    """Receivers in every namespace and one sender per namespace, started and stopped
    together, so that any direction can be asked for a transfer."""

    topo: Topology
    port: int = RECV_PORT
    receivers: list[subprocess.Popen] = field(default_factory=list)
    senders: dict[str, subprocess.Popen] = field(default_factory=dict)
    lock: dict[str, threading.Lock] = field(default_factory=dict)

    def start(self) -> None:
        spaces = [self.topo.wire.netns, *(g.netns for g in self.topo.guests)]
        for ns in spaces:
            rx = self._agent(ns, "recv")
            if rx.stdout.readline().strip() != "ready":
                raise RuntimeError(f"receiver in {ns} did not start")
            self.receivers.append(rx)
            tx = self._agent(ns, "send")
            if not json.loads(tx.stdout.readline()).get("ready"):
                raise RuntimeError(f"sender in {ns} did not start")
            self.senders[ns] = tx
            self.lock[ns] = threading.Lock()

    def _agent(self, ns: str, what: str) -> subprocess.Popen:
        argv = [*netns_exec(ns), sys.executable, "-m", "shared.lab.transfers", what,
                "--port", str(self.port)]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO_ROOT, start_new_session=True)

    def transfer(self, src_ns: str, dst_ip: str, nbytes: int, seed: int) -> dict:
        """Ask the sender in ``src_ns`` for one verified transfer to ``dst_ip``."""
        p = self.senders[src_ns]
        with self.lock[src_ns]:
            p.stdin.write(json.dumps({"host": dst_ip, "port": self.port, "bytes": nbytes,
                                      "seed": seed}) + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
        if not line:
            return {"ok": False, "bytes": 0, "lost": True, "corrupt": False,
                    "error": f"sender agent in {src_ns} died"}
        return json.loads(line)

    def stop(self) -> None:
        for p in [*self.receivers, *self.senders.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.close()
        self.receivers.clear()
        self.senders.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.lab.transfers")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="agent: verify incoming transfers")
    r.add_argument("--port", type=int, default=RECV_PORT)
    s = sub.add_parser("send", help="agent: run transfers asked for on stdin")
    s.add_argument("--port", type=int, default=RECV_PORT)
    a = p.parse_args(argv)
    if a.cmd == "recv":
        serve_receiver(a.port)
    else:
        sender_agent()
    return 0


if __name__ == "__main__":
    sys.exit(main())
