#!/usr/bin/env bash
# Builds (once; cached in $1) an OCI layout holding the Debian `base` and `py` images of
# tests/support/debian-images.sh plus `pip`: py with numpy and scipy installed by pip from
# PyPI's manylinux wheels (large shared objects: OpenBLAS, the Fortran runtime, compiled
# extensions), as a user building a Python image would. Prints the layout directory.
# Usage: benches/startup/pip-image.sh CACHE_DIR DEBIAN_OCI_LAYOUT
set -euo pipefail
cache=${1:?cache dir}
src=${2:?the layout of tests/support/debian-images.sh}
oci=$cache/oci
if [ -f "$cache/done" ]; then
  echo "$oci"
  exit 0
fi
rm -rf "$cache" && mkdir -p "$cache"
cp -a "$src" "$oci"
umoci unpack --image "$oci:py" "$cache/bundle" >/dev/null
cp /etc/resolv.conf "$cache/bundle/rootfs/etc/resolv.conf"
# The host's CA bundle for pip (a TLS-inspecting proxy's CA, if the host trusts one); removed
# from the image afterwards.
cp /etc/ssl/certs/ca-certificates.crt "$cache/bundle/rootfs/tmp/host-ca.crt"
chroot "$cache/bundle/rootfs" /usr/bin/env -u PIP_FIND_LINKS PIP_CERT=/tmp/host-ca.crt DEBIAN_FRONTEND=noninteractive sh -c '
  apt-get update -qq &&
  apt-get install -y -qq --no-install-recommends python3-pip >/dev/null &&
  pip install -q --no-cache-dir --break-system-packages --only-binary=:all: \
    --cert /tmp/host-ca.crt numpy scipy &&
  rm -f /tmp/host-ca.crt && apt-get clean && rm -rf /var/lib/apt/lists/*' >"$cache/pip.log" 2>&1
umoci repack --image "$oci:pip" "$cache/bundle"
rm -rf "$cache/bundle"
touch "$cache/done"
echo "$oci"
