"""Choose the QEMU accelerator: KVM only when it can really boot our guest, else TCG.

Why a real boot and not a look at /dev/kvm: on this machine /dev/kvm is KVM-PVM, which opens
fine but cannot run a stock kernel (it hangs in early boot or dies with an emulation failure;
`-cpu host` aborts on MSR 0x10a). So the probe boots the image's kernel with `pvnet.probe` on
the command line, where /init prints a marker and powers off at once, and waits a bounded time
for that marker. The answer is cached in ~/.cache/pvnet/accel.json, keyed on the kernel
version, the presence of /dev/kvm and the QEMU version, because a failed KVM probe costs its
whole timeout (with a CPU spinning).

Override with the environment variable PVNET_ACCEL=kvm|tcg (no probe).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

from shared.lab.image.build import build_image
from shared.lab.image.cache import CACHE_DIR
from shared.lab.image.store import ImageInfo

Accel = Literal["kvm", "tcg"]
QEMU = "qemu-system-x86_64"
CACHE_FILE = CACHE_DIR / "accel.json"
PROBE_MARKER = b"PVNET-PROBE-OK"


@dataclass(frozen=True)
class ProbeResult:
    accel: Accel
    ok: bool
    seconds: float
    detail: str  # why it failed, or the marker line


def cpu_args(accel: Accel) -> list[str]:
    """The -cpu option that goes with an accelerator (probe and launch must agree).

    TCG: qemu64 plus RDRAND, so the guest kernel's CRNG is ready at once; without it the first
    getrandom() (python3's start-up, sshd) blocks ~1 s, sometimes 4 s, on jitter entropy.
    """
    return ["-cpu", "host"] if accel == "kvm" else ["-cpu", "qemu64,+rdrand"]


def qemu_version(binary: str = QEMU) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{binary} not usable: {e} (apt-get install qemu-system-x86)") from e
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def kvm_device_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def probe(image: ImageInfo, accel: Accel, timeout: float = 10.0) -> ProbeResult:
    """Boot the image's kernel under `accel` until /init's probe marker, at most `timeout` s."""
    argv = [
        QEMU, "-machine", "q35", "-accel", accel, *cpu_args(accel), "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 quiet panic=-1 pvnet.probe",
        "-serial", "stdio",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    out = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                return ProbeResult(accel, False, timeout, f"no marker in {timeout:.0f}s")
            if sel.select(min(left, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    tail = out.decode(errors="replace").strip().splitlines()[-3:]
                    return ProbeResult(accel, False, time.monotonic() - t0,
                                       f"QEMU exited without the marker: {' | '.join(tail)}")
                out += chunk
                at = out.find(PROBE_MARKER)
                if at >= 0 and b"\n" in out[at:]:  # the whole line: it carries uname -r
                    line = out[at:].split(b"\n")[0].decode(errors="replace").strip()
                    return ProbeResult(accel, True, time.monotonic() - t0, line)
    finally:
        sel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def _cache_key(image: ImageInfo) -> str:
    return f"{image.kernel_version}|kvm={os.path.exists('/dev/kvm')}|{qemu_version()}"


def detect_accel(
    image: ImageInfo | None = None,
    timeout: float = 10.0,
    *,
    use_cache: bool = True,
    verbose: bool = False,
) -> Accel:
    """"kvm" if KVM boots the guest kernel to /init within `timeout` s, else "tcg". Never hangs."""
    forced = os.environ.get("PVNET_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced  # type: ignore[return-value]
    if not kvm_device_usable():
        return "tcg"
    image = image or build_image(progress=verbose)
    key = _cache_key(image)
    cache: dict[str, dict[str, object]] = {}
    if use_cache and CACHE_FILE.exists():
        try:
            cache = json.loads(CACHE_FILE.read_text())
        except ValueError:
            cache = {}
        if key in cache and cache[key].get("accel") in ("kvm", "tcg"):
            return cache[key]["accel"]  # type: ignore[return-value]
    print(f"accel: probing whether KVM boots the guest kernel (at most {timeout:.0f}s; the "
          f"answer is cached in {CACHE_FILE})", file=sys.stderr, flush=True)
    res = probe(image, "kvm", timeout)
    accel: Accel = "kvm" if res.ok else "tcg"
    print(f"accel: KVM probe {'ok' if res.ok else 'failed'} in {res.seconds:.1f}s "
          f"({res.detail}): using {accel}", file=sys.stderr, flush=True)
    cache[key] = {"accel": accel, "seconds": round(res.seconds, 2), "detail": res.detail,
                  "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=2) + "\n")
    tmp.rename(CACHE_FILE)
    return accel


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python3 -m shared.lab.accel",
                                 description="Print the accelerator QEMU guests will use.")
    ap.add_argument("--no-cache", action="store_true", help="probe again")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    print(detect_accel(timeout=args.timeout, use_cache=not args.no_cache, verbose=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
