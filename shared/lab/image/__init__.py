"""Build the QEMU guest image: an ELF vmlinux, a busybox initramfs and an unpacked sshd.

Why this shape (see vm-images/README.md for the whole recipe):
- Nothing is installed on the host: Debian packages are fetched with `apt-get download` and
  unpacked with `dpkg -x` into the cache (~/.cache/pvnet, see cache_dir()), never into the
  checkout. The kernel is the package linux-image-amd64 currently depends on (the non-cloud
  flavour: the cloud one has no 9p).
- The guest boots the *uncompressed* ELF vmlinux found inside the xz bzImage (PVH entry via
  QEMU -kernel): under TCG the xz decompressor alone costs seconds of emulated CPU.
- The initramfs holds busybox-static, the recipe's /init and only the kernel modules listed in
  vm-images/modules.txt plus their dependencies (the full module tree is ~400 MB).
- The guest's userland is the host's, over read-only 9p, so sshd is the only extra program: it
  lives in the cache (reachable by the guest at the same path) with its own host key.
- The build is cached (images/<recipe id>/): a stamp hashes the recipe files (vm-images/
  minus *.md, plus this package's sources) and the kernel package name and version; the image
  is rebuilt only when that hash changes (or with --force).

Usage: python3 -m shared.lab.image [--force] [--json] [--quiet]

The modules, in build order: cache (where), recipe (what, and its hash), debs (apt-get
download, dpkg -x), kmods (the module closure), vmlinux (the ELF inside the bzImage), cpio and
initramfs (the initrd), store (built images in the cache and their stamps), build (the steps
in order, under a lock), cli (the command above). steps holds the failure type and progress.
"""
