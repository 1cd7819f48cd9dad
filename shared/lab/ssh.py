"""paramiko helpers to manage QEMU guests over ssh (user networking hostfwd on 127.0.0.1).

Why paramiko and not the ssh binary: no known_hosts/agent/config side effects on the host, the
guest's host key is checked against the image's own key (no "accept anything"), and one
connection can be kept open for many commands (~0.2 s each under TCG instead of a new
handshake per command).
"""

from __future__ import annotations

import base64
import fcntl
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from shared.lab.image.cache import CACHE_DIR
from shared.lab.keys import write_ed25519_key

DEFAULT_KEY_DIR = CACHE_DIR / "ssh"


class SSHError(RuntimeError):
    """ssh to a guest failed: connect timeout, command timeout, or a host key mismatch."""


@dataclass(frozen=True)
class KeyPair:
    """The lab's client key: the private key file and its one-line OpenSSH public key."""

    private_path: Path
    public_line: str

    def load(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key_file(str(self.private_path))


def ensure_keypair(key_dir: Path = DEFAULT_KEY_DIR) -> KeyPair:
    """The lab's ed25519 client key, created once under the cache (~/.cache/pvnet/ssh, 0600;
    never in the checkout), under a lock: concurrent first runs must agree on one key.
    """
    key_dir.mkdir(parents=True, exist_ok=True)
    priv_path = key_dir / "id_ed25519"
    pub_path = key_dir / "id_ed25519.pub"
    with open(key_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (priv_path.exists() and pub_path.exists()):
            write_ed25519_key(priv_path, "pvnet-lab")
        return KeyPair(priv_path, pub_path.read_text().strip())


def _host_key(host_key_pub: Path | None) -> paramiko.PKey | None:
    if host_key_pub is None:
        return None
    kind, data = host_key_pub.read_text().split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


def connect(
    port: int,
    *,
    host: str = "127.0.0.1",
    key: KeyPair | None = None,
    host_key_pub: Path | None = None,
    timeout: float = 10.0,
) -> paramiko.SSHClient:
    """One ssh connection as root. With host_key_pub, the guest must present exactly that key."""
    key = key or ensure_keypair()
    client = paramiko.SSHClient()
    expected = _host_key(host_key_pub)
    if expected is not None:
        client.get_host_keys().add(f"[{host}]:{port}", expected.get_name(), expected)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        host,
        port=port,
        username="root",
        pkey=key.load(),
        timeout=timeout,
        banner_timeout=timeout,
        auth_timeout=timeout,
        allow_agent=False,
        look_for_keys=False,
    )
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(15)
    return client


def exec_command(
    client: paramiko.SSHClient, cmd: str | Sequence[str], timeout: float = 60.0
) -> tuple[int, str, str]:
    """Run one command on an open connection: (exit status, stdout, stderr).

    A list is quoted with shlex.join; a string goes to the remote shell as it is.
    """
    command = cmd if isinstance(cmd, str) else shlex.join(cmd)
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise SSHError("ssh connection is closed")
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        while True:
            if chan.recv_ready():
                out += chan.recv(65536)
            elif chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            elif chan.exit_status_ready():
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                break
            elif time.monotonic() > deadline:
                raise SSHError(f"command timed out after {timeout:.0f}s: {command}")
            else:
                time.sleep(0.005)
        rc = chan.recv_exit_status()
    finally:
        chan.close()
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


def wait_ssh(
    port: int,
    timeout: float = 60.0,
    *,
    key: KeyPair | None = None,
    host_key_pub: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> paramiko.SSHClient:
    """Poll until sshd in the guest runs a command; return that connection.

    `alive` (e.g. "is QEMU still running") stops the wait early with a clear error instead of
    polling a dead guest until the timeout.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise SSHError(f"guest died while waiting for ssh on port {port} (last: {last})")
        try:
            client = connect(port, key=key, host_key_pub=host_key_pub,
                             timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        except (OSError, paramiko.SSHException, EOFError) as e:
            last = e
            time.sleep(0.25)
            continue
        try:
            rc, _, err = exec_command(client, "true", timeout=max(1.0, deadline - time.monotonic()))
        except (OSError, paramiko.SSHException, SSHError) as e:
            client.close()
            last = e
            time.sleep(0.25)
            continue
        if rc == 0:
            return client
        client.close()
        last = SSHError(f"`true` exited {rc}: {err}")
    raise SSHError(f"no ssh on 127.0.0.1:{port} after {timeout:.0f}s (last error: {last!r})")


def run(
    port: int,
    cmd: str | Sequence[str],
    timeout: float = 60.0,
    *,
    key: KeyPair | None = None,
    host_key_pub: Path | None = None,
) -> tuple[int, str, str]:
    """Connect, run one command, disconnect: (exit status, stdout, stderr)."""
    client = connect(port, key=key, host_key_pub=host_key_pub, timeout=min(timeout, 30.0))
    try:
        return exec_command(client, cmd, timeout)
    finally:
        client.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the caller must tolerate a race and retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
