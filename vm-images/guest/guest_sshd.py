"""sshd in the guest (the lab's management path) and the shell profile its sessions get.

(Standard library only: the guest runs it with the host's python3 -I -S, see guest_init.py.)
"""

import os
import shlex
import subprocess

from guest_base import STATE, say


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

