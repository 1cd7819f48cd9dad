"""ed25519 key pairs in OpenSSH format: the guest's sshd host key and the lab's client key.

Generated with `cryptography` (a paramiko dependency): paramiko itself cannot generate ed25519
keys, and ssh-keygen need not be installed.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_ed25519_key(private_path: Path, comment: str) -> Path:
    """A fresh key: the private key at `private_path` (0600, renamed into place whole, so a
    reader never sees half a key) and `<private_path>.pub` ("ssh-ed25519 AAAA... comment").
    Returns the .pub path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    tmp = private_path.with_name(private_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path = private_path.with_name(private_path.name + ".pub")
    pub_path.write_bytes(pub + f" {comment}\n".encode())
    tmp.rename(private_path)
    return pub_path
