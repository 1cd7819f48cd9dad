"""The guest's network and kernel settings: hostname, NICs (matched by MAC), virtio ports,
sysctls.

(Standard library only: the guest runs it with the host's python3 -I -S, see guest_init.py.)
"""

import os
import time

from guest_base import say, sh


def set_hostname(name):
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)
    with open("/etc/hostname", "w") as f:
        f.write(name + "\n")
    with open("/etc/hosts", "w") as f:
        f.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost\n")


def iface_by_mac():
    out = {}
    for name in os.listdir("/sys/class/net"):
        try:
            with open(f"/sys/class/net/{name}/address") as f:
                out[f.read().strip().lower()] = name
        except OSError:
            pass
    return out


def setup_interfaces(ifaces):
    sh("ip", "link", "set", "lo", "up")
    by_mac = iface_by_mac()
    for spec in ifaces:
        mac = spec["mac"].lower()
        name = by_mac.get(mac)
        if name is None:
            raise RuntimeError(f"no interface with MAC {mac} (have {by_mac})")
        new = spec.get("name")
        if new and new != name:
            sh("ip", "link", "set", name, "name", new)
            name = new
        if spec.get("mtu"):
            sh("ip", "link", "set", name, "mtu", str(spec["mtu"]))
        for addr in spec.get("addresses", []):
            sh("ip", "addr", "add", addr, "dev", name)
        sh("ip", "link", "set", name, "up")
        if spec.get("gateway"):
            sh("ip", "route", "add", "default", "via", spec["gateway"], "dev", name)
        say("{} ({}) up {}".format(name, mac, " ".join(spec.get("addresses", []))))


def link_virtio_ports(wait_s=3.0):
    """No udev here: make /dev/virtio-ports/<name> from /sys/class/virtio-ports/*/name.

    Port names arrive from QEMU over the control queue after the driver probed, so a name can
    still be empty right after boot: retry for a short while.
    """
    base = "/sys/class/virtio-ports"
    if not os.path.isdir(base):
        return
    os.makedirs("/dev/virtio-ports", exist_ok=True)
    deadline = time.monotonic() + wait_s
    pending = set(os.listdir(base))
    while pending:
        for port in sorted(pending):
            try:
                with open(os.path.join(base, port, "name")) as f:
                    name = f.read().strip()
            except OSError:
                name = ""
            if name:
                link = os.path.join("/dev/virtio-ports", name)
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink("../" + port, link)
                say(f"virtio port {link} -> /dev/{port}")
                pending.discard(port)
        if pending and time.monotonic() < deadline:
            time.sleep(0.1)
        elif pending:
            say("virtio ports without a name: {}".format(" ".join(sorted(pending))))
            break


def apply_sysctls(sysctls):
    """Kernel settings from the config ("net.ipv4.tcp_min_tso_segs": "44"), before any run
    command starts; a setting this kernel lacks is said on the console, not fatal."""
    for key, value in sorted(sysctls.items()):
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
            say(f"sysctl {key} = {value}")
        except OSError as e:
            say(f"sysctl {key} = {value}: cannot set: {e}")

