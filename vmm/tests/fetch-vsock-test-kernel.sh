#!/bin/sh
# Puts the Debian 6.12 cloud kernel (vmlinuz + modules) where vmm/tests/vsock_qemu.rs looks for
# it: $HUSK_VSOCK_KERNEL_ROOT, default /tmp/husk-vsock-kernel. Needs bookworm-backports or
# bookworm-security in apt's sources (see shared ENVIRONMENT notes).
set -eu
root="${HUSK_VSOCK_KERNEL_ROOT:-/tmp/husk-vsock-kernel}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download linux-image-6.12-cloud-amd64
dep="$(dpkg-deb -f linux-image-6.12-cloud-amd64_*.deb Depends | sed -n 's/^\(linux-image-[^ ,]*\).*/\1/p')"
apt-get download "$dep"
rm -rf "$root"
mkdir -p "$root"
dpkg-deb -x "$(ls linux-image-6.12.*-cloud-amd64_*.deb | grep -v '^linux-image-6.12-cloud')" "$root"
ls "$root"/boot/vmlinuz-*
