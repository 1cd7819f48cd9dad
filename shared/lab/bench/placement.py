"""Which core runs what during a run, so that runs are comparable on this 2-core machine.

Two placements, chosen by the workload (``Workload.placement``):

    split   (tcp, tcp-nogso, rr): a guest core and a host core, as a Xen guest and its
            driver domain would have. CPU 0: the netfront, the guest-side client (iperf3 -c,
            rr.py client) and a QEMU guest's vCPU threads. CPU 1: the netback, the wire-side
            server (iperf3 -s via the client's ``-A 0,1``, rr.py server) and QEMU's other
            threads (its device model: virtio-net's backend, the pvnet ports).
    path    (pps64, pps1496): a generator core and a path core. CPU 0: trafgen alone (it
            pins its one worker to CPU 0 itself). CPU 1: every process of the path (netfront,
            netback, QEMU with all its threads). An unshaped generator needs a core of its
            own; see pps.py for why it is not paced.

A multi-queue end's queue workers (``-q<N>`` modes) are spread as Linux spreads a device's
queue interrupts (one queue per CPU, round robin): in ``split``, queue q of the netfront on
CPU q and queue q of the netback on CPU q+1 (mod the CPUs), so each core serves one queue of
each end; in ``path`` they stay on the path core with the rest of the path (the generator
keeps the other: on this 2-core machine a packet-rate run has no second core for a queue).

Pinning is os.sched_setaffinity on every thread of a process, done before each run (a
restarted end is pinned again). A machine with one allowed CPU runs everything on it.

pvnet's own ends (the netback, a namespace netfront and their queue workers; not QEMU, so a
virtio-net baseline is run as it always was) also run ``SCHED_BATCH``: the kernel then never
preempts a running task to run a woken end. Without it, a kick or a frame from the
generator switched the path core to the woken end in the middle of the other's batch, and
the preempted end sat runnable at the system call that woke its peer; py-spy counts a
runnable thread as working, so those waits were sampled as work at that line: in a 64 B run
on the shared path core the netback's stages put 25-30 % in ``notify`` with one kick per
~70 frames (1.9 µs each: 0.2 % of its CPU), and the netfront's waits, sampled at its poll,
were dropped as idle. With no wake-up preemption an end is only switched out at the end of
its slice, wherever it is, so its sampled stacks are again in proportion to its CPU (notify
0-2 % in the same runs), and a batch is not cut short by a kick, as Linux's NAPI poll runs
its budget out. The time an end waited for a CPU is in the records (``wait_*_us_per_frame``,
measure.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

SPLIT, PATH = "split", "path"
GUEST_CPU_INDEX, HOST_CPU_INDEX = 0, 1


def cpus() -> tuple[int, int]:
    """(guest/generator CPU, host/path CPU) among the CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[GUEST_CPU_INDEX], allowed[min(HOST_CPU_INDEX, len(allowed) - 1)]


def threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def thread_name(tid: int) -> str:
    try:
        return Path(f"/proc/{tid}/comm").read_text().strip()
    except OSError:
        return ""


def is_qemu(pid: int) -> bool:
    return thread_name(pid).startswith("qemu")


def is_vcpu(name: str) -> bool:
    """QEMU names its vCPU threads "CPU <n>/TCG" or "CPU <n>/KVM"."""
    return name.startswith("CPU ") and "/" in name


def _pin(tid: int, cpu: int, batch: bool) -> None:
    with contextlib.suppress(OSError):  # a thread may exit between listing and pinning
        os.sched_setaffinity(tid, {cpu})
        if batch:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))


def pin_process(pid: int, cpu: int, vcpu: int | None = None) -> None:
    """Every thread of `pid` onto `cpu`; a QEMU's vCPU threads onto `vcpu` if given. A
    process other than QEMU (one of pvnet's ends) also runs SCHED_BATCH (above: why)."""
    batch = not is_qemu(pid)
    for tid in threads(pid):
        on_vcpu = vcpu is not None and is_vcpu(thread_name(tid))
        _pin(tid, vcpu if on_vcpu and vcpu is not None else cpu, batch)


def pin_ends(pids: Mapping[str, int], placement: str,
             workers: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """Pin a path's processes (role "front"/"back" -> pid, and each end's queue workers)
    for `placement`, pvnet's ends SCHED_BATCH; what was done, as the record's ``cpus``
    text."""
    guest, host = cpus()
    done = []
    for role, ws in sorted((workers or {}).items()):
        if ws:
            done.append(pin_workers(role, ws, placement))
    for role, pid in sorted(pids.items()):
        if placement == PATH:
            pin_process(pid, host)
            done.append(f"{role} {host}")
        elif is_qemu(pid):
            pin_process(pid, host, vcpu=guest)
            done.append(f"{role} (QEMU) vCPU {guest}, rest {host}")
        else:
            cpu = guest if role == "front" else host
            pin_process(pid, cpu)
            done.append(f"{role} {cpu}")
    tools = (f"generator {guest}" if placement == PATH
             else f"client {guest}, server {host}")
    return ", ".join([*done, tools])


def pin_workers(role: str, workers: tuple[int, ...], placement: str) -> str:
    """An end's queue workers: queue q on CPU q (front) or q+1 (back) of the allowed CPUs in
    ``split``, all on the path core in ``path``; what was done, for ``cpus``."""
    allowed = sorted(os.sched_getaffinity(0))
    _guest, host = cpus()
    first = GUEST_CPU_INDEX if role == "front" else HOST_CPU_INDEX
    got = []
    for q, pid in enumerate(workers):
        cpu = host if placement == PATH else allowed[(first + q) % len(allowed)]
        pin_process(pid, cpu)
        got.append(str(cpu))
    return f"{role} queues {','.join(got)}"
