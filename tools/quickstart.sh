#!/usr/bin/env bash
# Quick start: what lsm is for — start a container from an image without downloading it first.
#  1. install what is needed and build lsmctl, lsmd and lsm-snapshotter;
#  2. start a local registry (Debian's docker-registry) on 127.0.0.1;
#  3. build a small real image with umoci: a static busybox, a greeting, and 64 MiB of data
#     the container never reads (the bulk of a real image: libraries, docs, models...);
#  4. push it, and convert it into lsm layers with `lsmctl convert` (pushed to the registry);
#  5. start lsm-snapshotter and containerd (own sockets and directories under the work dir),
#     pull the converted image with `lsmctl pull` (no layer is downloaded) and run a command in
#     it with `ctr run --snapshotter lsm`;
#  6. print how many layer bytes the registry served against the image's size.
# Everything runs as root (containerd, mounts). The work directory is $LSM_QUICKSTART_DIR,
# default target/quickstart; every process the script starts is stopped at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" -eq 0 ] || { echo "quickstart: run as root (containerd, runc and mounts need it)" >&2; exit 1; }
bash tests/install-deps.sh
echo "== 1. build lsmctl, lsmd, lsm-snapshotter"
cargo build --release -q -p lsm-tools -p lsmd -p lsm-snapshotter
bin="${CARGO_TARGET_DIR:-$repo/target}/release"
L="$bin/lsmctl"
w=${LSM_QUICKSTART_DIR:-$repo/target/quickstart}
pids=()
cleanup() {
  set +e
  ctr --address "$w/containerd.sock" -n quickstart tasks kill -s SIGKILL demo >/dev/null 2>&1
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  grep -o " $w[^ ]*" /proc/self/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null
}
trap cleanup EXIT
if [ -d "$w" ]; then
  grep -o " $w[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$w"
fi
mkdir -p "$w"

echo "== 2. a local registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$w/registry"
cat >"$w/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $w/registry/data
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$w/registry/config.yml" >"$w/registry/registry.log" 2>&1 &
pids+=($!)
reg=127.0.0.1:$port
for _ in $(seq 100); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done

echo "== 3. a small real image: static busybox, a greeting, 64 MiB of data never read"
oci="$w/oci"
# (unpack + repack, as an image build does: `umoci insert` of a single file writes a tar
# without its end-of-archive blocks, which lsmctl convert rejects)
umoci init --layout "$oci"
umoci new --image "$oci:demo"
umoci unpack --image "$oci:demo" "$w/bundle" >/dev/null
mkdir -p "$w/bundle/rootfs/bin" "$w/bundle/rootfs/etc" "$w/bundle/rootfs/opt/data"
cp /usr/bin/busybox "$w/bundle/rootfs/bin/busybox"
echo "hello from a lazily pulled lsm image" >"$w/bundle/rootfs/etc/greeting"
umoci repack --image "$oci:demo" "$w/bundle"
rm -rf "$w/bundle"
umoci unpack --image "$oci:demo" "$w/bundle" >/dev/null
head -c 64M /dev/urandom >"$w/bundle/rootfs/opt/data/bulk.bin"
umoci repack --image "$oci:demo" "$w/bundle"
rm -rf "$w/bundle"
umoci config --image "$oci:demo" --config.cmd /bin/busybox

echo "== 4. push it, convert it into lsm layers (pushed as quickstart/demo-lsm:1)"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$oci:demo" "docker://$reg/quickstart/demo:1"
"$L" convert --insecure --quiet --db "$w/convert-db" \
  "http://$reg/quickstart/demo:1" "http://$reg/quickstart/demo-lsm:1"
image=$reg/quickstart/demo-lsm:1
layers=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://$reg/v2/quickstart/demo-lsm/manifests/1" |
  python3 -c 'import json,sys; print(" ".join("%s:%d" % (l["digest"], l["size"]) for l in json.load(sys.stdin)["layers"]))')

echo "== 5. lsm-snapshotter + containerd; lsmctl pull; ctr run"
RUST_LOG=info "$bin/lsm-snapshotter" --socket "$w/lsm.sock" --root "$w/lsm-root" --plain-http "$reg" 2>"$w/snapshotter.log" &
pids+=($!)
cat >"$w/containerd.toml" <<EOF
version = 2
root = "$w/containerd-root"
state = "$w/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$w/containerd.sock"
[ttrpc]
  address = "$w/containerd.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.lsm]
    type = "snapshot"
    address = "$w/lsm.sock"
EOF
for _ in $(seq 100); do [ -S "$w/lsm.sock" ] && break; sleep 0.1; done
containerd --config "$w/containerd.toml" 2>"$w/containerd.log" &
pids+=($!)
ctr_() { ctr --address "$w/containerd.sock" -n quickstart "$@"; }
for _ in $(seq 100); do ctr_ version >/dev/null 2>&1 && break; sleep 0.1; done
served() { # bytes the registry served of the image's layer blobs
  local total=0 d n
  for l in $layers; do
    d=${l%:*}
    n=$(grep "response completed" "$w/registry/registry.log" | grep "http.request.method=GET" |
      grep "/blobs/$d\"" | grep -o 'http.response.written=[0-9]*' | cut -d= -f2 | paste -sd+ | bc)
    total=$((total + ${n:-0}))
  done
  echo "$total"
}
"$L" pull --plain-http --address "$w/containerd.sock" --namespace quickstart "$image"
echo "   layer bytes served by the registry after the pull: $(served)"
ctr_ run --rm --snapshotter lsm "$image" demo /bin/busybox cat /etc/greeting

echo "== 6. what the registry served"
size=0
for l in $layers; do size=$((size + ${l##*:})); done
s=$(served)
echo "image layers: $size bytes; served by the registry to start the container: $s bytes ($(echo "scale=2; 100*$s/$size" | bc) %)"
echo "done: logs and files are in $w"
