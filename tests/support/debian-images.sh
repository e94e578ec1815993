#!/usr/bin/env bash
# Builds (once; cached in $1, outside the clone) an OCI image layout of real Debian images:
#   base — `debootstrap --variant=minbase bookworm`, one layer;
#   py   — base plus a layer that installs python3 with apt inside it.
# Made with umoci, as a user would. Prints the layout directory.
# Usage: tests/support/debian-images.sh CACHE_DIR
set -euo pipefail
cache=${1:?cache dir}
oci=$cache/oci
if [ -f "$cache/done" ]; then echo "$oci"; exit 0; fi
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
# The python3 layer, on a fresh unpack of base: apt inside the image, caches cleaned as an
# image build would.
rm -rf "$cache/bundle"
umoci unpack --image "$oci:base" "$cache/bundle" >/dev/null
chroot "$cache/bundle/rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*' \
  >"$cache/apt.log" 2>&1
umoci repack --image "$oci:py" "$cache/bundle"
rm -rf "$cache/bundle" "$cache/rootfs"
touch "$cache/done"
echo "$oci"
