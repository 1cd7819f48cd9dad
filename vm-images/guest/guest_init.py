"""pvnet guest init, stage 2b: apply the guest JSON config written by the lab on the host.

Runs once at boot inside the guest as root, with the host's /usr/bin/python3 (-I -S: standard
library only, no site-packages, so it starts fast and cannot be broken by the host's packages).
It is a recipe file of the guest image (vm-images/guest/), copied into the initramfs as
/pvnet/guest_init.py and from there to /run/pvnet-boot/ by stage 1, with the modules it
imports beside it (guest_base, guest_net, guest_sshd, guest_runs: the whole guest/ directory).

Why Python and not sh: the config is JSON (argv lists, env maps) and busybox has no JSON parser.

The JSON (argument 1 is its HOST path; it is read through /host, the read-only 9p view):
  hostname         str
  interfaces       [{mac, name?, addresses?: ["a.b.c.d/n"], gateway?, mtu?}]  matched by MAC
  ssh              {sshd_dir, authorized_keys: [str], port?: 22, env?: {}}
  env              {NAME: value} for the run commands and ssh sessions (PATH first of all)
  cwd              working directory of the run commands and of ssh sessions
  run              [[argv...], ...] started in the background, each logged to the console and
                   to /run/pvnet-guest/<i>.log; "run[i] ...: cannot start: ..." or
                   "run[i] ...: exited (status N): <its last line>" on the console when one fails
  host_paths       [host dirs] the guest must see at their own paths: those under /tmp or /run
                   (its own tmpfs there) are bind-mounted from /host (a venv, a checkout)
Prints PVNET-GUEST-READY on the console when done; PVNET-INIT-FAILED on a fatal error.
"""

import json
import os
import sys

# -I leaves the script's own directory off sys.path: put it back for the modules beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guest_base import HOST_VIEW, STATE, say, sh, uptime  # noqa: E402
from guest_net import apply_sysctls, link_virtio_ports, set_hostname, setup_interfaces  # noqa: E402
from guest_runs import start_supervised  # noqa: E402
from guest_sshd import start_sshd, write_shell_profile  # noqa: E402


def load_config(host_path):
    if not host_path:
        say("no pvnet.conf= on the kernel command line: no config applied")
        return {}
    path = HOST_VIEW + host_path if host_path.startswith("/") else host_path
    with open(path) as f:
        return json.load(f)


#: directories that are fresh tmpfs in the guest: the host's files there are only in /host
SHADOWED = ("/tmp/", "/run/")


def bind_host_paths(paths):
    """Bind-mount each shadowed host path (a venv or checkout under /tmp or /run) from /host
    to its own path, so that the interpreter, its pyvenv.cfg, editable-install finders and the
    repo work in the guest under the very absolute paths they have on the host.

    Paths outside /tmp and /run are visible already (the overlay's lower layer is the host
    root). A path inside another one of the list is covered by the outer bind."""
    wanted = sorted({os.path.normpath(p) for p in paths if p and p.startswith(SHADOWED)})
    done = []
    for path in wanted:
        if any(path == d or path.startswith(d + "/") for d in done):
            continue
        source = HOST_VIEW + path
        if not os.path.isdir(source):
            say(f"host path {path}: not a directory on the host, not mapped")
            continue
        os.makedirs(path, exist_ok=True)
        sh("mount", "-o", "bind", source, path)
        done.append(path)
        say(f"host path {path} mapped from {source}")
    return done


def main():
    os.makedirs(STATE, exist_ok=True)
    conf_path = sys.argv[1] if len(sys.argv) > 1 else ""
    say("guest_init.py started")
    conf = load_config(conf_path)
    env = {k: str(v) for k, v in conf.get("env", {}).items()}
    cwd = conf.get("cwd")
    ssh = conf.get("ssh")
    bind_host_paths([*conf.get("host_paths", []), cwd or "", ssh["sshd_dir"] if ssh else ""])
    if conf.get("hostname"):
        set_hostname(conf["hostname"])
    setup_interfaces(conf.get("interfaces", []))
    apply_sysctls(conf.get("sysctls", {}))
    link_virtio_ports()
    write_shell_profile(env, cwd)
    if ssh:
        start_sshd(ssh, env)
    start_supervised(conf.get("run", []), env, cwd)
    with open(os.path.join(STATE, "ready"), "w") as f:
        f.write(uptime() + "\n")
    say(f"ready at {uptime()}s")
    print("PVNET-GUEST-READY", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report anything on the console, then fail visibly
        say(f"FATAL: {type(e).__name__}: {e}")
        print("PVNET-INIT-FAILED", flush=True)
        sys.exit(1)
