"""What every step of the guest's init uses: its paths, console lines and busybox applets.

(Standard library only: the guest runs it with the host's python3 -I -S, see guest_init.py.)
"""

import subprocess

BB = "/run/pvnet-boot/busybox"
STATE = "/run/pvnet-guest"
HOST_VIEW = "/host"


def uptime():
    with open("/proc/uptime") as f:
        return f.read().split()[0]


def say(msg):
    print(f"pvnet-guest: [{uptime()}] {msg}", flush=True)


def sh(*argv, check=True):
    """Run a busybox applet (the host may lack iproute2 etc.; busybox is always ours)."""
    res = subprocess.run([BB, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stdout}")
    return res

