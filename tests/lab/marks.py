"""Markers and paths shared by the full-tier lab tests (imported, not a conftest)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: the QEMU placement: root, QEMU and iperf3 (KVM when it works, TCG otherwise)
needs_qemu = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
    or shutil.which("iperf3") is None,
    reason="the QEMU placement needs root, qemu-system-x86 and iperf3")
