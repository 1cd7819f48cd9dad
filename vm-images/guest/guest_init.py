"""pvnet guest init, stage 2b: apply the guest JSON config written by the lab on the host.

Runs once at boot inside the guest as root, with the host's /usr/bin/python3 (-I -S: standard
library only, no site-packages, so it starts fast and cannot be broken by the host's packages).
It is a recipe file of the guest image (vm-images/guest/), copied into the initramfs as
/pvnet/guest_init.py and from there to /run/pvnet-boot/ by stage 1.

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
import shlex
import subprocess
import sys
import time

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


def load_config(host_path):
    if not host_path:
        say("no pvnet.conf= on the kernel command line: no config applied")
        return {}
    path = HOST_VIEW + host_path if host_path.startswith("/") else host_path
    with open(path) as f:
        return json.load(f)


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


def write_shell_profile(env, cwd):
    """Blank the host's heavy ~/.bashrc (pyenv init etc.) for the guest's root; export env.

    bash sources ~/.bashrc for every ssh command (Debian builds it with SSH_SOURCE_BASHRC), so
    this is also how ssh sessions get the lab's PATH and working directory.
    """
    lines = ["# written by pvnet guest_init.py: the host's ~/.bashrc is not run in the guest"]
    for key, value in env.items():
        lines.append(f"export {key}={shlex.quote(str(value))}")
    if cwd:
        lines.append(f"cd {shlex.quote(cwd)} 2>/dev/null || true")
    text = "\n".join(lines) + "\n"
    home = "/root"
    for name in (".bashrc", ".profile"):
        with open(os.path.join(home, name), "w") as f:
            f.write(text)


def ensure_sshd_account():
    """sshd's privilege separation needs the "sshd" user; a root password hash starting with
    "!" makes sshd refuse even key logins when PAM is off. Both are fixed in the overlay only."""
    with open("/etc/passwd") as f:
        passwd = f.read()
    if not any(line.startswith("sshd:") for line in passwd.splitlines()):
        with open("/etc/passwd", "a") as f:
            if passwd and not passwd.endswith("\n"):
                f.write("\n")
            f.write("sshd:x:74:65534:sshd privsep:/run/sshd:/usr/sbin/nologin\n")
    try:
        with open("/etc/shadow") as f:
            shadow = f.read().splitlines()
    except OSError:
        return
    fixed = []
    for line in shadow:
        if line.startswith("root:!"):
            fields = line.split(":")
            fields[1] = "*"
            line = ":".join(fields)
        fixed.append(line)
    with open("/etc/shadow", "w") as f:
        f.write("\n".join(fixed) + "\n")
    os.chmod("/etc/shadow", 0o640)


def start_sshd(ssh, env):
    sshd_dir = ssh["sshd_dir"]
    port = int(ssh.get("port", 22))
    ensure_sshd_account()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.chmod("/run/sshd", 0o755)
    keys_path = os.path.join(STATE, "authorized_keys")
    with open(keys_path, "w") as f:
        f.write("\n".join(ssh.get("authorized_keys", [])) + "\n")
    os.chmod(keys_path, 0o600)
    all_env = {**env, **ssh.get("env", {})}
    setenv = " ".join('"{}={}"'.format(k, str(v).replace('"', "")) for k, v in all_env.items())
    config = [
        f"Port {port}",
        "ListenAddress 0.0.0.0",
        f"HostKey {sshd_dir}/ssh_host_ed25519_key",
        f"PidFile {STATE}/sshd.pid",
        f"AuthorizedKeysFile {keys_path}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 50",
        "MaxSessions 50",
        f"Subsystem sftp {sshd_dir}/usr/lib/openssh/sftp-server",
    ]
    if setenv:
        config.append("SetEnv " + setenv)
    cfg_path = os.path.join(STATE, "sshd_config")
    with open(cfg_path, "w") as f:
        f.write("\n".join(config) + "\n")
    libs = [
        os.path.join(sshd_dir, d)
        for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
        if os.path.isdir(os.path.join(sshd_dir, d))
    ]
    sshd_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if libs:
        sshd_env["LD_LIBRARY_PATH"] = ":".join(libs)
    res = subprocess.run(
        [os.path.join(sshd_dir, "usr/sbin/sshd"), "-f", cfg_path, "-E",
         os.path.join(STATE, "sshd.log")],
        env=sshd_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"sshd failed ({res.returncode}): {res.stdout}")
    say(f"sshd listening on port {port}")


def start_runs(run, env, cwd):
    """Start each command in the background; its output goes to the console and to a file.

    Returns [(i, argv, command Popen, tee Popen)] of those that started. The output is piped
    through busybox tee (detached), so the lab on the host sees it on the console. A command
    that cannot start is reported as "run[i] ...: cannot start: <why>" on the console: the lab
    fails on that line.
    """
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in env.items()})
    workdir = cwd if cwd and os.path.isdir(cwd) else "/"
    started = []
    for i, argv in enumerate(run):
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        log = os.path.join(STATE, f"{i}.log")
        with open(log, "ab") as f:
            f.write(f"# run[{i}]: {shlex.join(argv)}\n".encode())
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=full_env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as e:
            say(f"run[{i}] {shlex.join(argv)}: cannot start: {e}")
            with open(log, "a") as f:
                f.write(f"cannot start: {e}\n")
            continue
        with open("/dev/console", "wb") as console:
            tee = subprocess.Popen([BB, "tee", "-a", log], stdin=proc.stdout, stdout=console,
                                   start_new_session=True)
        proc.stdout.close()
        with open(os.path.join(STATE, f"{i}.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        say(f"run[{i}] pid {proc.pid}: {shlex.join(argv)}")
        started.append((i, argv, proc, tee))
    return started


def last_line(path):
    """The last non-empty line of a run's log: the component's own error line when it died."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def supervise(started):
    """Wait for the run commands and report each exit on the console, with its last line.

    The lab on the host watches the console for "run[i] ... exited": a netfront that dies at
    start-up (an import error, a bad argument) fails `invoke up` at once, not at its timeout.
    """
    pending = {proc.pid: (i, argv, tee) for i, argv, proc, tee in started}
    while pending:
        try:
            pid, raw = os.wait()  # in whatever order they end (tees are reaped here too)
        except ChildProcessError:
            return
        if pid not in pending:
            continue
        i, argv, tee = pending.pop(pid)
        try:  # tee ends at the pipe's EOF: then the log holds the command's last words
            tee.wait(2.0)
        except subprocess.TimeoutExpired:
            pass  # a child of the command still holds the pipe: report what is there
        say(f"run[{i}] {shlex.join(argv)}: exited (status {os.waitstatus_to_exitcode(raw)}): "
            f"{last_line(os.path.join(STATE, f'{i}.log'))}")


def start_supervised(run, env, cwd):
    """Start the run commands from a forked supervisor that outlives this script (which must
    exit: busybox init waits for its sysinit action) and reports their exits; return once
    every command was started (or failed to)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.close(r)
        try:
            os.setsid()
            started = start_runs(run, env, cwd)
        finally:
            os.write(w, b"1")
            os.close(w)
        try:
            supervise(started)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)


#: directories that are fresh tmpfs in the guest: the host's files there are only in /host
SHADOWED = ("/tmp/", "/run/")


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
