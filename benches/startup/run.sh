#!/usr/bin/env bash
# The startup benchmark: time from nothing on the node to a finished command inside the image,
# lsm (lazy, and with a recorded startup trace) against a full OCI pull + unpack, with the
# registry behind a shaped link. One command from a clean clone (root; installs what it needs):
#
#   bash benches/startup/run.sh            # RUNS=5 PROFILES="unlimited 1gbit 100mbit" IMAGES="base py pip"
#   LOOP_DIO=1 bash benches/startup/run.sh # the loop device with --direct-io=on (several reads in flight)
#   READ_AHEAD_KB=2560 bash benches/startup/run.sh # the loop devices' readahead (default 128 KiB)
#   MODES="oci shipped shipped-t2 shipped-t4" ... # shipped-tN: the shipped row with N prefetch fetches in flight
#   CHUNK_SIZE=32K bash benches/startup/run.sh   # the lsm images' chunk size (convert --chunk-size; default 128K)
#   LSMD_ARGS="--hot-group-kb 1024" ...          # more `lsmd serve` arguments for every lsm row
#
# What it does:
#  1. builds (once, cached in /var/cache/lsm-images) real Debian images: `base` (debootstrap
#     minbase), `py` (+ python3), `pip` (py + numpy and scipy installed by pip from PyPI's
#     wheels: pip-image.sh) — or, when PyPI is unreachable, `fat` (py + Debian's python3-numpy,
#     python3-scipy) in its place, which the output says; an image named `X-erofs` (e.g.
#     IMAGES="py py-erofs") is image X converted with `lsmctl convert --fs erofs` (one
#     flattened read-only erofs layer) instead of ext4, run with X's command;
#  2. starts docker-registry inside a network namespace, reached from the host through a veth
#     pair; the namespace's side is shaped with `tc tbf` and a delaying proxy
#     (delay_proxy.py: this kernel has no netem) adds the round-trip time:
#       unlimited — no shaping, no delay;  1gbit — 1 Gbit/s, 1 ms RTT;  100mbit — 100 Mbit/s, 5 ms RTT;
#  3. pushes the OCI images there with skopeo, converts them from there with `lsmctl convert
#     --push`, records a node startup trace per image (one untimed lsm run + `lsmctl trace
#     record`) and bakes a shipped one (`lsmctl trace bake`: pushed beside the layers, named
#     with its digest in the config);
#  4. for each profile, image and run, from a cold node (empty dirs and cache, page cache dropped):
#       oci   — skopeo copy (every layer) + tar -x of each layer in order + chroot COMMAND
#       bare  — lsmd --fuse with an empty cache and --prefetch none, losetup, mount -o ro,
#               chroot COMMAND ("lsm lazy, no prefetch")
#       lazy  — the same with lsmd's default prefetch and no trace: the used ext4 inode tables
#               are fetched at open ("lsm lazy")
#       trace — the same, lsmd prefetching the trace this node recorded ("lsm + node trace")
#       shipped — the same, lsmd fetching the trace shipped in the image, checking its digest
#                 and prefetching by it ("lsm + shipped trace"; nothing recorded on the node),
#                 with its startup layer (the blocks the baked start read, FORMAT.md §9);
#                 shipped-nostartup: the same trace without the startup layer (whole chunks)
#     and, through containerd 1.6 (a fresh containerd + lsm-snapshotter per run, in its own
#     directories and sockets; started before the clock):
#       ctr-oci  — `ctr image pull` (overlayfs snapshotter: every layer fetched and unpacked)
#                  + `ctr run --rm` COMMAND
#       ctr-lazy — `lsmctl pull` of the converted image (no layer fetched) + `ctr run --rm
#                  --snapshotter lsm` COMMAND (lsm-snapshotter attaches the layers lazily)
#       ctr-shipped — the same for the image with its startup trace baked into the manifest
#                  (`lsmctl trace bake --image-ref`, tag `shipped`): the snapshotter hands the
#                  trace to each disk's lsmd, which checks its digest and prefetches by it
#     timing each from start to the command's exit and counting the bytes the host received
#     on the veth (TCP/IP headers included);
#     (lsmd's log and /metrics of each lsm run are kept in $WORK/logs; the runs CSV also
#     has lsmd's own count of GETs and bytes from the registry);
#  5. writes results/startup-phases.csv (each lsm run's phases: lsmd up, mounted, trace ready,
#     prefetch done, command done, teardown; phases.py), results/startup-runs.csv (every run), results/startup.csv and results/startup.md
#     (medians, lsm/OCI ratios, bytes fetched and fraction of the image) and results/startup.png.
# Everything it makes — namespace, veth, mounts, loop devices, processes — is removed on exit,
# also on Ctrl-C or an error. Two runs may go at once: each takes its own slot (namespace,
# addresses, ports, /var/tmp/lsm-startup-SLOT, results-SLOT past slot 0), and every run's row
# records the host's load average as it started (the `load` column of the table).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
RUNS=${RUNS:-5}
PROFILES=${PROFILES:-"unlimited 1gbit 100mbit"}
IMAGES=${IMAGES:-"base py pip"}
MODES=${MODES:-"oci bare lazy trace shipped ctr-oci ctr-lazy ctr-shipped"}
READ_AHEAD_KB=${READ_AHEAD_KB:-128} # of the loop devices of the lsm rows and of trace bake
LSMD_ARGS=${LSMD_ARGS:-} # more `lsmd serve` arguments for every lsm row
CHUNK_SIZE=${CHUNK_SIZE:-128K} # `lsmctl convert --chunk-size` of the lsm images

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, mounts, drop_caches)" >&2; exit 1; }

# Two runs may go at once (another worktree's containerd rows, say): each takes a free slot N —
# a lock file held for the run's life — and its own namespace, veth pair, subnet, lsmd metrics
# port, work dir and (past slot 0) results dir from it. What two runs still share: the CPU,
# the page cache (each run's `drop_caches` empties the other's too) and the image cache (built
# under a lock).
mkdir -p /run/lsm-startup
for SLOT in $(seq 0 31); do
  exec {slot_fd}>"/run/lsm-startup/slot-$SLOT.lock"
  flock -n "$slot_fd" && break
  exec {slot_fd}>&-
  [ "$SLOT" = 31 ] && { echo "startup: all 32 bench slots are taken" >&2; exit 1; }
done
OUT=${OUT:-$here/results$([ "$SLOT" = 0 ] || echo "-$SLOT")}
WORK=${WORK:-/var/tmp/lsm-startup-$SLOT}
NS=lsmbench$SLOT
VH=lsmb${SLOT}h # host side of the veth pair
VN=lsmb${SLOT}n # namespace side
HOST_IP=10.231.$SLOT.1
NS_IP=10.231.$SLOT.2
METRICS=127.0.0.1:$((9899 + SLOT * 10)) # lsmd's /metrics during a run
REG=$NS_IP:5001 # the delaying proxy in front of the registry (127.0.0.1:5000 in the namespace)
load() { cut -d' ' -f1-3 /proc/loadavg; }
now() { date +%s.%N; }
echo "startup: slot $SLOT (namespace $NS, work dir $WORK, results in $OUT); load average $(load)"

base_of() { echo "${1%-erofs}"; } # the OCI image an lsm image is converted from
fs_of() { case $1 in *-erofs) echo erofs ;; *) echo ext4 ;; esac; }
BASES=$(for i in $IMAGES; do base_of "$i"; done | awk '!seen[$0]++' | tr '\n' ' ')
command_for() {
  case $(base_of "$1") in
    base) echo "/usr/bin/dpkg-query -W coreutils" ;;
    py) echo "/usr/bin/python3 -c 'import json, sqlite3, email.parser, http.client'" ;;
    fat | pip) echo "/usr/bin/python3 -c 'import numpy, scipy.linalg; numpy.linalg.inv(numpy.eye(4))'" ;;
  esac
}

# --- cleanup, whatever happens ---------------------------------------------------------------
cleanup() ( # a subshell: its `set +e` must not leak into the script
  set +e
  if [ -d "$WORK/pids" ]; then # containerd before its snapshotter, both before the mounts go
    for p in containerd snapshotter; do [ -f "$WORK/pids/$p" ] && kill "$(cat "$WORK/pids/$p")" 2>/dev/null; done
  fi
  for m in $(grep -o " $WORK/[^ ]*" /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null; done
  losetup -a 2>/dev/null | grep "$WORK" | cut -d: -f1 | while read -r l; do losetup -d "$l"; done
  if [ -d "$WORK/pids" ]; then
    for p in "$WORK"/pids/*; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null; done
    sleep 0.5
    for p in "$WORK"/pids/*; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null; rm -f "$p"; done
  fi
  for m in $(grep -o " $WORK/[^ ]*" /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null; done
  if ip netns list 2>/dev/null | grep -qw "$NS"; then
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$NS"
  fi
  ip link del "$VH" 2>/dev/null
  exit 0
)
trap cleanup EXIT
trap 'exit 130' INT TERM
cleanup

# --- dependencies, binaries, images ----------------------------------------------------------
bash "$repo/tests/install-deps.sh"
need=()
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v pip >/dev/null || need+=(python3-pip) # pip-image.sh downloads the wheels with it
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
(cd "$repo" && nice -n 15 cargo build --release --bins -q) # niced like every build on a shared host
LSMD=$repo/target/release/lsmd
LSMCTL=$repo/target/release/lsmctl
SNAPSHOTTER=$repo/target/release/lsm-snapshotter
echo "startup: building/finding the Debian images (cached in /var/cache/lsm-images)"
mkdir -p /var/cache/lsm-images
exec {images_fd}>/var/cache/lsm-images/.lock
flock "$images_fd" # one builder at a time; released below, once the images exist
if [[ " $BASES " == *" pip "* ]]; then
  OCI=$(bash "$repo/tests/support/debian-images.sh" /var/cache/lsm-images/debian-v1)
  if ! OCI=$(bash "$here/pip-image.sh" /var/cache/lsm-images/pip-v1 "$OCI"); then
    echo "startup: PyPI unreachable (see /var/cache/lsm-images/pip-v1/pip.log): Debian's python3-numpy/scipy image (fat) instead of pip's"
    IMAGES=${IMAGES//pip/fat} BASES=${BASES//pip/fat}
    OCI=$(bash "$repo/tests/support/debian-images.sh" /var/cache/lsm-images/debian-v1 fat)
  fi
else
  OCI=$(bash "$repo/tests/support/debian-images.sh" /var/cache/lsm-images/debian-v1 \
    "$([[ " $BASES " == *" fat "* ]] && echo fat)")
fi

exec {images_fd}>&-
rm -rf "$WORK" && mkdir -p "$WORK/pids" "$OUT"

# --- the registry in its namespace -----------------------------------------------------------
ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$HOST_IP/24" dev "$VH"
ip link set "$VH" up
ip netns exec "$NS" ip addr add "$NS_IP/24" dev "$VN"
ip netns exec "$NS" ip link set "$VN" up
ip netns exec "$NS" ip link set lo up
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: 127.0.0.1:5000
EOF
ip netns exec "$NS" docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
echo $! >"$WORK/pids/registry"

start_proxy() { # ONE_WAY_DELAY_MS
  if [ -f "$WORK/pids/proxy" ]; then
    kill "$(cat "$WORK/pids/proxy")" 2>/dev/null || true
    rm -f "$WORK/pids/proxy"
    sleep 0.3
  fi
  ip netns exec "$NS" python3 "$here/delay_proxy.py" "$NS_IP:5001" 127.0.0.1:5000 "$1" \
    >"$WORK/proxy.log" 2>&1 &
  echo $! >"$WORK/pids/proxy"
  for _ in $(seq 100); do
    curl -fs "http://$REG/v2/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the registry or the proxy did not come up: $(cat "$WORK/registry.log" "$WORK/proxy.log")" >&2
  return 1
}

shape() { # PROFILE: tbf on the namespace's egress (registry → host) and the host's (requests)
  local rate="" rtt_ms=0
  case $1 in
    unlimited) ;;
    1gbit) rate=1gbit rtt_ms=1 ;;
    100mbit) rate=100mbit rtt_ms=5 ;;
    *) echo "unknown profile $1" >&2; return 1 ;;
  esac
  ip netns exec "$NS" tc qdisc del dev "$VN" root 2>/dev/null || true
  tc qdisc del dev "$VH" root 2>/dev/null || true
  if [ -n "$rate" ]; then
    local burst=$([ "$rate" = 1gbit ] && echo 256kb || echo 64kb)
    ip netns exec "$NS" tc qdisc add dev "$VN" root tbf rate "$rate" burst "$burst" latency 20ms
    tc qdisc add dev "$VH" root tbf rate "$rate" burst "$burst" latency 20ms
  fi
  start_proxy "$(python3 -c "print($rtt_ms / 2)")"
}

shape unlimited

# --- push, convert, record traces --------------------------------------------------------------
declare -A OCI_BYTES LSM_BYTES
for img in $BASES; do
  echo "startup: pushing $img (OCI)"
  skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$OCI:$img" "docker://$REG/debian/$img:1"
done
for img in $IMAGES; do
  echo "startup: converting $img ($(fs_of "$img"))"
  "$LSMCTL" convert -q --insecure --no-reuse --fs "$(fs_of "$img")" --chunk-size "$CHUNK_SIZE" \
    "http://$REG/debian/$(base_of "$img"):1" "$WORK/lsm-$img" --push "http://$REG/lsm/$img:1" >/dev/null
  OCI_BYTES[$img]=$(python3 - "$OCI" "$(base_of "$img")" <<'EOF'
import json, sys
oci, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(f"{oci}/index.json"))
m = next(x for x in idx["manifests"] if x["annotations"]["org.opencontainers.image.ref.name"] == tag)
man = json.load(open(f"{oci}/blobs/sha256/{m['digest'][7:]}"))
print(sum(l["size"] for l in man["layers"]))
EOF
)
  LSM_BYTES[$img]=$(python3 -c "import json,sys; print(sum(l['source']['registry']['size'] for l in json.load(open(sys.argv[1]))['layers']))" "$WORK/lsm-$img/lsm-remote.json")
  mkdir -p "$WORK/traced"
  cp "$WORK/lsm-$img/lsm-remote.json" "$WORK/traced/$img.json"
  echo "startup: $img: OCI ${OCI_BYTES[$img]} bytes, lsm ${LSM_BYTES[$img]} bytes"
done

rx() { cat "/sys/class/net/$VH/statistics/rx_bytes"; }

# One lsm start: lsmd with an empty cache, FUSE file, loop, mount, COMMAND. Leaves the
# teardown to lsm_stop. Args: IMAGE CONFIG RUN_DIR PREFETCH [more lsmd serve arguments]
lsm_start() {
  local img=$1 cfg=$2 d=$3 prefetch=$4
  shift 4
  mkdir -p "$d/files" "$d/mnt"
  # shellcheck disable=SC2086 # LSMD_ARGS: more arguments, split on spaces
  "$LSMD" serve --config "$img=$cfg" --fuse "$d/files" --cache-dir "$d/cache" \
    --prefetch "$prefetch" --socket "$d/sock" --metrics "$METRICS" $LSMD_ARGS "$@" >"$d/lsmd.log" 2>&1 &
  echo $! >"$WORK/pids/lsmd"
  for _ in $(seq 2000); do
    [ -e "$d/files/$img" ] && break
    kill -0 "$(cat "$WORK/pids/lsmd")" 2>/dev/null || { cat "$d/lsmd.log" >&2; return 1; }
    sleep 0.005
  done
  echo "lsmd_up $(now)" >>"$d/marks"
  local loop
  loop=$(losetup -r -f --show ${LOOP_DIO:+--direct-io=on} "$d/files/$img")
  echo "$loop" >"$d/loop"
  # The readahead lsm gives its disks (lsmctl attach --loop, trace bake, lsm-snapshotter), not
  # the loop's 2560 KiB: every page read ahead is fetched.
  [ "$READ_AHEAD_KB" = 0 ] || echo "$READ_AHEAD_KB" >"/sys/block/${loop#/dev/}/queue/read_ahead_kb"
  mount -o "ro$([ "$(fs_of "$img")" = ext4 ] && echo ,noload)" "$loop" "$d/mnt"
  echo "mounted $(now)" >>"$d/marks"
}
lsm_stop() { # RUN_DIR IMAGE
  local d=$1 img=$2
  umount "$d/mnt" 2>/dev/null || umount -l "$d/mnt"
  losetup -d "$(cat "$d/loop")"
  # The loop device lets go of the FUSE file asynchronously; lsmd can only unmount its FUSE
  # directory once it has.
  for _ in $(seq 200); do
    losetup -j "$d/files/$img" 2>/dev/null | grep -q . || break
    sleep 0.02
  done
  kill "$(cat "$WORK/pids/lsmd")" 2>/dev/null || true
  while kill -0 "$(cat "$WORK/pids/lsmd")" 2>/dev/null; do sleep 0.05; done
  rm -f "$WORK/pids/lsmd"
  if mountpoint -q "$d/files"; then umount -l "$d/files"; fi
}

# A fresh lsm-snapshotter + containerd in RUN_DIR (own root, state, sockets; CRI off).
ctr_start() {
  local d=$1
  mkdir -p "$d"
  "$SNAPSHOTTER" --socket "$d/lsm.sock" --root "$d/lsm-root" --plain-http "$REG" --read-ahead-kb "$READ_AHEAD_KB" \
    >"$d/snapshotter.log" 2>&1 &
  echo $! >"$WORK/pids/snapshotter"
  for _ in $(seq 600); do [ -S "$d/lsm.sock" ] && break; sleep 0.05; done
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/containerd-root"
state = "$d/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.lsm]
    type = "snapshot"
    address = "$d/lsm.sock"
EOF
  containerd --config "$d/containerd.toml" >"$d/containerd.log" 2>&1 &
  echo $! >"$WORK/pids/containerd"
  for _ in $(seq 600); do
    ctr --address "$d/containerd.sock" version >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "containerd did not start: $(tail "$d/containerd.log")" >&2
  return 1
}
ctr_stop() { # RUN_DIR
  local d=$1 p
  for p in containerd snapshotter; do
    [ -f "$WORK/pids/$p" ] || continue
    kill "$(cat "$WORK/pids/$p")" 2>/dev/null || true
    while kill -0 "$(cat "$WORK/pids/$p")" 2>/dev/null; do sleep 0.05; done
    rm -f "$WORK/pids/$p"
  done
  for m in $(grep -o " $d/[^ ]*" /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
ctr_() { ctr --address "$d/containerd.sock" -n bench "$@"; }

for img in $IMAGES; do
  echo "startup: recording the startup trace of $img"
  d=$WORK/run/record-$img
  lsm_start "$img" "$WORK/traced/$img.json" "$d" none
  chroot "$d/mnt" sh -c "$(command_for "$img")" >/dev/null
  "$LSMCTL" trace record "$WORK/traced/$img.json" --export "$img" --metrics "$METRICS" >/dev/null
  lsm_stop "$d" "$img"
  rm -rf "$d"
done

# A shipped trace per image: `lsmctl trace bake` runs the command once over the image (its own
# lsmd, cold) and pushes the trace beside the layers; $WORK/shipped/IMAGE.json names it.
bake_shipped() { # IMAGE
  local img=$1
  mkdir -p "$WORK/shipped"
  cp "$WORK/lsm-$img/lsm-remote.json" "$WORK/shipped/$img.json"
  "$LSMCTL" trace bake --read-ahead-kb "$READ_AHEAD_KB" "$WORK/shipped/$img.json" -- "$(command_for "$img")"
  # The same trace without its startup layer (mode shipped-nostartup): whole chunks only.
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c.pop("startup",None); json.dump(c,open(sys.argv[2],"w"))' \
    "$WORK/shipped/$img.json" "$WORK/shipped/$img-nostartup.json"
}
for img in $IMAGES; do
  echo "startup: baking the shipped startup trace of $img"
  bake_shipped "$img"
done
# For containerd the trace must be in the manifest: the image is tagged `shipped` too (the same
# manifest) and a trace baked into that tag's manifest (`--image-ref`), so `:1` stays without.
if [[ " $MODES " == *" ctr-shipped "* ]]; then
  for img in $IMAGES; do
    echo "startup: baking a startup trace into the manifest of lsm/$img:shipped"
    mt=application/vnd.oci.image.manifest.v1+json
    curl -fsS -H "Accept: $mt" "http://$REG/v2/lsm/$img/manifests/1" -o "$WORK/manifest-$img.json"
    curl -fsS -X PUT -H "Content-Type: $mt" --data-binary "@$WORK/manifest-$img.json" \
      "http://$REG/v2/lsm/$img/manifests/shipped" >/dev/null
    mkdir -p "$WORK/ctr-shipped"
    cp "$WORK/lsm-$img/lsm-remote.json" "$WORK/ctr-shipped/$img.json"
    "$LSMCTL" trace bake --read-ahead-kb "$READ_AHEAD_KB" "$WORK/ctr-shipped/$img.json" --image-ref "http://$REG/lsm/$img:shipped" \
      -- "$(command_for "$img")"
  done
fi

# lsmd's own count of what it fetched in a run: "GETs,bytes" from its saved /metrics.
lsm_fetches() { # METRICS_FILE
  python3 - "$1" <<'EOF'
import sys
v = {}
for line in open(sys.argv[1]):
    for name in ("lsm_source_requests_total", "lsm_source_bytes_total"):
        if line.startswith(name + '{source="registry"}'):
            v[name] = int(float(line.split()[-1]))
print(f'{v.get("lsm_source_requests_total", "")},{v.get("lsm_source_bytes_total", "")}')
EOF
}

# --- the runs ------------------------------------------------------------------------------------
runs=$OUT/startup-runs.csv
phases=$OUT/startup-phases.csv # where each lsm run's time went (phases.py)
echo "profile,image,mode,run,lsmd_up,mounted,trace_ready,prefetch_done,prefetch_fetches,cmd_done,teardown" >"$phases"
echo "profile,image,mode,run,seconds,bytes_fetched,oci_image_bytes,lsm_image_bytes,lsm_gets,lsm_bytes,load1" >"$runs"
cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }

for profile in $PROFILES; do
  shape "$profile"
  # What the link gives: one 32 MiB range of a converted blob, timed.
  probe_img=$(echo "$IMAGES" | awk '{print $NF}')
  big=$(python3 -c "import json,sys; l=max(json.load(open(sys.argv[1]))['layers'], key=lambda l: l['source']['registry']['size']); print(l['digest'])" "$WORK/lsm-$probe_img/lsm-remote.json")
  rate=$(curl -s -o /dev/null -r 0-33554431 -w '%{speed_download}' "http://$REG/v2/lsm/$probe_img/blobs/$big")
  echo "startup: profile $profile: link measured at $(python3 -c "print(round($rate * 8 / 1e6))") Mbit/s"
  for img in $IMAGES; do
    cmd=$(command_for "$img")
    for r in $(seq "$RUNS"); do
      for mode in $MODES; do
        d=$WORK/run/$profile-$img-$mode-$r
        rm -rf "$d" && mkdir -p "$d"
        case $mode in ctr-*) ctr_start "$d" ;; esac
        cold
        load1=$(cut -d' ' -f1 /proc/loadavg) # the host's load as the run starts
        b0=$(rx)
        t0=$(now)
        case $mode in
          oci)
            skopeo copy -q --insecure-policy --src-tls-verify=false \
              "docker://$REG/debian/$(base_of "$img"):1" "oci:$d/oci:$img"
            mkdir -p "$d/rootfs"
            python3 - "$d/oci" "$img" <<'EOF' | while read -r layer; do tar -xzf "$layer" -C "$d/rootfs" --numeric-owner; done
import json, sys
oci, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(f"{oci}/index.json"))
m = next(x for x in idx["manifests"] if x["annotations"]["org.opencontainers.image.ref.name"] == tag)
man = json.load(open(f"{oci}/blobs/sha256/{m['digest'][7:]}"))
for l in man["layers"]:
    print(f"{oci}/blobs/sha256/{l['digest'][7:]}")
EOF
            chroot "$d/rootfs" sh -c "$cmd" >/dev/null
            ;;
          bare)
            lsm_start "$img" "$WORK/lsm-$img/lsm-remote.json" "$d" none
            chroot "$d/mnt" sh -c "$cmd" >/dev/null
            ;;
          lazy)
            lsm_start "$img" "$WORK/lsm-$img/lsm-remote.json" "$d" trace
            chroot "$d/mnt" sh -c "$cmd" >/dev/null
            ;;
          trace)
            lsm_start "$img" "$WORK/traced/$img.json" "$d" trace
            chroot "$d/mnt" sh -c "$cmd" >/dev/null
            ;;
          ctr-oci)
            ctr_ image pull --plain-http "$REG/debian/$(base_of "$img"):1" >/dev/null
            ctr_ run --rm "$REG/debian/$(base_of "$img"):1" "run-$r" sh -c "$cmd" >/dev/null
            ;;
          ctr-lazy)
            "$LSMCTL" pull --plain-http --address "$d/containerd.sock" --namespace bench \
              "$REG/lsm/$img:1" >/dev/null 2>"$d/pull.log"
            ctr_ run --rm --snapshotter lsm "$REG/lsm/$img:1" "run-$r" sh -c "$cmd" >/dev/null
            ;;
          ctr-shipped)
            "$LSMCTL" pull --plain-http --address "$d/containerd.sock" --namespace bench \
              "$REG/lsm/$img:shipped" >/dev/null 2>"$d/pull.log"
            ctr_ run --rm --snapshotter lsm "$REG/lsm/$img:shipped" "run-$r" sh -c "$cmd" >/dev/null
            ;;
          shipped)
            lsm_start "$img" "$WORK/shipped/$img.json" "$d" trace
            chroot "$d/mnt" sh -c "$cmd" >/dev/null
            ;;
          shipped-nostartup) # the same trace without its startup layer (FORMAT.md §9)
            lsm_start "$img" "$WORK/shipped/$img-nostartup.json" "$d" trace
            chroot "$d/mnt" sh -c "$cmd" >/dev/null
            ;;
          shipped-t*) # the same, lsmd keeping N prefetch fetches in flight (not in the table)
            lsm_start "$img" "$WORK/shipped/$img.json" "$d" trace --prefetch-threads "${mode#shipped-t}"
            chroot "$d/mnt" sh -c "$cmd" >/dev/null
            ;;
        esac
        t1=$(now)
        b1=$(rx)
        echo "cmd_done $t1" >>"$d/marks"
        case $mode in ctr-*)
          mkdir -p "$WORK/logs"
          ctr_stop "$d"
          cp "$d/snapshotter.log" "$WORK/logs/$profile-$img-$mode-$r.snapshotter.log"
          ;;
        esac
        fetches=,
        if [ "$mode" != oci ] && [[ $mode != ctr-* ]]; then
          mkdir -p "$WORK/logs"
          curl -s "http://$METRICS/metrics" >"$WORK/logs/$profile-$img-$mode-$r.metrics" || true
          fetches=$(lsm_fetches "$WORK/logs/$profile-$img-$mode-$r.metrics")
          lsm_stop "$d" "$img"
          echo "stopped $(now)" >>"$d/marks"
          cp "$d/lsmd.log" "$WORK/logs/$profile-$img-$mode-$r.log"
          echo "$profile,$img,$mode,$r,$(python3 "$here/phases.py" "$t0" "$d/marks" "$d/lsmd.log")" >>"$phases"
        fi
        rm -rf "$d"
        secs=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
        echo "$profile,$img,$mode,$r,$secs,$((b1 - b0)),${OCI_BYTES[$img]},${LSM_BYTES[$img]},$fetches,$load1" >>"$runs"
        echo "startup: $profile $img $mode run $r: ${secs} s, $((b1 - b0)) bytes (lsmd GETs,bytes: $fetches), load $load1"
      done
    done
  done
done

python3 "$here/summarize.py" "$runs" "$OUT"
