#!/usr/bin/env bash
# Builds (once; cached in $1) an OCI layout holding the Debian `base` and `py` images of
# tests/support/debian-images.sh plus `pip`: py with numpy and scipy installed by pip from
# PyPI's manylinux wheels (large shared objects: OpenBLAS, the Fortran runtime, compiled
# extensions), as a user building a Python image would (pip itself from Debian). Prints the layout directory.
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
# The wheels are fetched by the host's pip (its proxy and CA settings apply), for the image's
# Python (bookworm: CPython 3.11, glibc 2.36), then installed inside the image from there.
pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$cache/wheels" numpy scipy >"$cache/pip.log" 2>&1
mkdir -p "$cache/bundle/rootfs/tmp/wheels"
cp "$cache"/wheels/*.whl "$cache/bundle/rootfs/tmp/wheels/"
cp /etc/resolv.conf "$cache/bundle/rootfs/etc/resolv.conf"
chroot "$cache/bundle/rootfs" /usr/bin/env -u PIP_FIND_LINKS -u PIP_CERT \
  DEBIAN_FRONTEND=noninteractive sh -c '
  apt-get update -qq &&
  apt-get install -y -qq --no-install-recommends python3-pip >/dev/null &&
  pip install -q --no-cache-dir --break-system-packages --no-index --find-links /tmp/wheels \
    numpy scipy &&
  rm -rf /tmp/wheels && apt-get clean && rm -rf /var/lib/apt/lists/*' >>"$cache/pip.log" 2>&1
umoci repack --image "$oci:pip" "$cache/bundle"
rm -rf "$cache/bundle"
touch "$cache/done"
echo "$oci"
