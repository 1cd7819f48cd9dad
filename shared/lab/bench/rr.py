"""Request/response latency: a 1-byte TCP ping-pong, server and client in one stdlib-only file.

Why our own tool: iperf3 has no latency mode, and Debian's sockperf would be one more package to
install in every guest image. This file imports nothing but the standard library so that a QEMU
guest (which runs the host's python3 over 9p) can execute it by path, like the namespaces do:

    rr.py server --port 7777 --seconds 20          # prints "ready <port>", serves one client
    rr.py client 10.81.0.1 --port 7777 --seconds 3 --count 200000   # prints one JSON line

Both ends set TCP_NODELAY (one byte per segment, no Nagle delay) and are bounded in time: the
server gives up after --seconds even if no client ever comes, the client stops at --count or
--seconds, whichever is first. The client discards --warmup round trips (connection set-up,
cold caches) before it starts timing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from array import array
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n*q/100), at least 1
    return float(sorted_values[min(int(rank), len(sorted_values)) - 1])


def summarize(samples_ns: Sequence[int], elapsed_s: float) -> dict[str, float | int]:
    """The client's JSON line: count, elapsed, transactions/s and latency percentiles in µs."""
    ordered = sorted(samples_ns)
    us = [v / 1000.0 for v in ordered]
    return {
        "count": len(us),
        "elapsed_s": round(elapsed_s, 6),
        "tps": round(len(us) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_us": round(percentile(us, 50), 2),
        "p90_us": round(percentile(us, 90), 2),
        "p99_us": round(percentile(us, 99), 2),
        "min_us": round(us[0], 2),
        "max_us": round(us[-1], 2),
        "mean_us": round(sum(us) / len(us), 2),
    }


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(bind: str, port: int, seconds: float) -> int:
    """Echo every byte of one client until it closes or `seconds` pass; 0 if a client came."""
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((bind, port))
        ls.listen(1)
        print(f"ready {ls.getsockname()[1]}", flush=True)
        ls.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            conn, _ = ls.accept()
        except TimeoutError:
            print("no client", file=sys.stderr)
            return 1
    with conn:
        _nodelay(conn)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return 0
            conn.settimeout(left)
            try:
                data = conn.recv(64)
            except TimeoutError:
                return 0
            if not data:
                return 0
            conn.sendall(data)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """Connect, retrying while the server (started a moment ago) is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=2.0)
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def client(host: str, port: int, count: int, seconds: float, warmup: int,
           connect_timeout: float = 5.0) -> dict[str, float | int]:
    """Ping-pong one byte `count` times (or for `seconds`) and summarize the round trips."""
    sock = _connect(host, port, connect_timeout)
    with sock:
        _nodelay(sock)
        sock.settimeout(max(2.0, seconds))
        one = b"x"
        send, recv, clock = sock.send, sock.recv, time.perf_counter_ns
        for _ in range(warmup):
            send(one)
            if not recv(1):
                raise ConnectionError("server closed during warm-up")
        samples = array("q")
        start = clock()
        stop = start + int(seconds * 1e9)
        t = start
        while len(samples) < count and t < stop:
            send(one)
            if not recv(1):
                raise ConnectionError("server closed the connection")
            now = clock()
            samples.append(now - t)
            t = now
        elapsed = (t - start) / 1e9
    if not samples:
        raise RuntimeError("no round trip completed")
    return summarize(samples, elapsed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rr.py", description="1-byte TCP request/response latency")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server", help="echo one client's bytes")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=7777)
    s.add_argument("--seconds", type=float, default=30.0, help="give up after this long")
    c = sub.add_parser("client", help="time 1-byte round trips; print one JSON line")
    c.add_argument("host")
    c.add_argument("--port", type=int, default=7777)
    c.add_argument("--count", type=int, default=1_000_000)
    c.add_argument("--seconds", type=float, default=3.0)
    c.add_argument("--warmup", type=int, default=200)
    a = p.parse_args(argv)
    if a.role == "server":
        return serve(a.bind, a.port, a.seconds)
    try:
        result = client(a.host, a.port, a.count, a.seconds, a.warmup)
    except (OSError, RuntimeError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
