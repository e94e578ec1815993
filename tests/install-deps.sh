#!/usr/bin/env bash
# Installs what building and testing lsm needs on a fresh Debian machine (idempotent, quiet).
# Tests use real tools: mkfs.ext4/debugfs/e2fsck (e2fsprogs), zstd, and NBD clients that lsm
# did not write: qemu-io/qemu-img (qemu-utils), nbdinfo/nbdcopy (libnbd-bin), fio (nbd engine);
# a real OCI registry (docker-registry) with htpasswd (apache2-utils) and, for its token auth,
# keys made with openssl; squid as the stand-in for a P2P agent's proxy; nbdkit (+ nbdfuse)
# as a flaky network filesystem; attr (setfattr/getfattr) for the FUSE-file tree compare;
# umoci, skopeo and debootstrap to build and move real OCI images for convert; containerd (1.6)
# and runc to test lsm-snapshotter, and protobuf-compiler (protoc) for its gRPC bindings' build;
# erofs-utils (mkfs.erofs) for `lsmctl convert --fs erofs`.
set -euo pipefail
need=()
for pair in mkfs.ext4:e2fsprogs debugfs:e2fsprogs zstd:zstd bc:bc python3:python3 \
  qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio \
  docker-registry:docker-registry htpasswd:apache2-utils openssl:openssl squid:squid \
  nbdkit:nbdkit setfattr:attr umoci:umoci skopeo:skopeo debootstrap:debootstrap \
  containerd:containerd ctr:containerd runc:runc protoc:protobuf-compiler \
  mkfs.erofs:erofs-utils; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust toolchain) is required" >&2; exit 1; }
