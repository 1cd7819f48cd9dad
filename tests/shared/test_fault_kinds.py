"""My modules say whose fault an error is (shared/faults.py): control replies, ivshmem, doorbell."""

from __future__ import annotations

import json

import pytest

from shared.faults import kind_of
from shared.plumbing.control.protocol import answer, dispatch
from shared.plumbing.doorbell import DoorbellError
from shared.plumbing.doorbell.host import HostDoorbell
from shared.plumbing.ivshmem import IvshmemClient, ServerUnreachable


def reply(line: bytes, commands: dict) -> dict:
    out = answer(dispatch(commands), line)
    assert isinstance(out, bytes)
    return json.loads(out)


def test_control_error_replies_name_whose_fault() -> None:
    def broken(_request: dict) -> dict:
        raise OSError(5, "disk gone")

    def buggy(_request: dict) -> dict:
        raise RuntimeError("oops")

    commands = {"broken": broken, "buggy": buggy}
    assert reply(b"{not json", commands)["fault"] == "peer"
    assert reply(b'{"cmd": "nope"}', commands)["fault"] == "peer"
    assert reply(b'{"cmd": "broken"}', commands)["fault"] == "os"
    assert reply(b'{"cmd": "buggy"}', commands)["fault"] == "own"
    assert "fault" not in reply(b'{"cmd": "ping"}', commands)


def test_no_ivshmem_server_is_the_os_fault_not_a_protocol_breach(tmp_path) -> None:
    with pytest.raises(ServerUnreachable) as info:
        IvshmemClient.connect(str(tmp_path / "none.sock"), timeout=0.2)
    assert kind_of(info.value) == "os"
    with pytest.raises(DoorbellError, match=r"\(os fault\)"):
        HostDoorbell.connect(str(tmp_path / "none.sock"), timeout=0.2)
