"""Fixtures for the QEMU lab tests (tests/lab only): the built guest image, QEMU presence."""

from __future__ import annotations

import shutil

import pytest

from shared.lab.image.build import build_image
from shared.lab.image.store import ImageInfo


@pytest.fixture(scope="session")
def guest_image() -> ImageInfo:
    """The cached guest image, built on first use (~10-20 s from nothing, apt-get download)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("the guest image recipe needs apt-get and dpkg (Debian)")
    return build_image(progress=False)


@pytest.fixture(scope="session")
def qemu_available() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
