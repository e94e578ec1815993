#!/usr/bin/env bash
# Builds (once; cached in $1, outside the clone) an OCI image layout of real Debian images:
#   base — `debootstrap --variant=minbase bookworm`, one layer;
#   py   — base plus a layer that installs python3 with apt inside it;
#   fat  — (only with the `fat` argument) py plus a layer with python3-numpy and python3-scipy
#          from Debian (a large real payload: BLAS, Fortran runtime, compiled extensions).
# Made with umoci, as a user would. Prints the layout directory.
# Usage: tests/support/debian-images.sh CACHE_DIR [fat]
set -euo pipefail
cache=${1:?cache dir}
want_fat=${2:-}
oci=$cache/oci
# Apt inside an unpacked image: caches cleaned afterwards, as an image build would.
apt_layer() { # TAG_FROM TAG_TO PACKAGES...
  local from=$1 to=$2; shift 2
  rm -rf "$cache/bundle"
  umoci unpack --image "$oci:$from" "$cache/bundle" >/dev/null
  chroot "$cache/bundle/rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $* >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*" \
    >"$cache/apt-$to.log" 2>&1
  umoci repack --image "$oci:$to" "$cache/bundle"
  rm -rf "$cache/bundle"
}
if [ -f "$cache/done" ]; then
  if [ "$want_fat" = fat ] && [ ! -f "$cache/done-fat" ]; then
    command -v umoci >/dev/null 2>&1 || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq umoci >/dev/null
    }
    apt_layer py fat python3-numpy python3-scipy
    touch "$cache/done-fat"
  fi
  echo "$oci"
  exit 0
fi
for pair in debootstrap:debootstrap umoci:umoci; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pair##*:}" >/dev/null
  }
done
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
rm -rf "$cache" && mkdir -p "$cache"
debootstrap --variant=minbase bookworm "$cache/rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1
umoci init --layout "$oci"
umoci new --image "$oci:base"
umoci unpack --image "$oci:base" "$cache/bundle" >/dev/null
cp -a "$cache/rootfs/." "$cache/bundle/rootfs/"
umoci repack --image "$oci:base" "$cache/bundle"
# The python3 layer, on a fresh unpack of base.
rm -rf "$cache/bundle"
apt_layer base py python3
if [ "$want_fat" = fat ]; then
  apt_layer py fat python3-numpy python3-scipy
  touch "$cache/done-fat"
fi
rm -rf "$cache/bundle" "$cache/rootfs"
touch "$cache/done"
echo "$oci"
