"""A typed QEMU launcher for pvnet guests, modelled on QEMU's python/qemu/machine (QEMUMachine).

launcher (the Machine: launch = pre-launch steps + start + post-launch steps, a context
manager), cmdline (the QEMU command line, kernel command line and guest.json it derives from a
config), config (the typed config: devices, guest spec, run-dir files), guest_env (what the
guest needs of this interpreter), qmp (a blocking QMP client), failure (MachineError: the
command line, exit code and log tails of a failed guest).
"""
