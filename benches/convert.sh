#!/usr/bin/env bash
# Conversion benchmark (issue 17): `lsmctl convert` of real Debian images beside `umoci unpack`
# and `skopeo copy` of the same image, in the same run, interleaved, medians of RUNS.
#
#   bash benches/convert.sh                 # RUNS=3 IMAGES="base l12 l30 weights" WEIGHTS_MIB=2048
#
# Images (built once, cached in /var/cache/lsm-images; see benches/convert_images.py):
#   base    — debootstrap minbase bookworm, 1 layer (tests/support/debian-images.sh)
#   l12     — base + python3 (apt) + 10 generated application layers = 12 layers
#   l30     — the same with 28 generated layers = 30 layers
#   weights — base + one layer with a WEIGHTS_MIB float32-like file (2 layers)
# Each run: page cache warm (the source blobs were just read by the previous tool), output on
# the same disk as the source. Peak RSS from /usr/bin/time (%M). Writes results/convert.md.
# Each image is converted twice: by default (the work tree goes to /dev/shm when it and the
# available memory have room, else inside DST; the run says which) and with the work tree
# on the disk (`--work-dir $WORK/disk`, beside the output).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
RUNS=${RUNS:-3}
IMAGES=${IMAGES:-"base l12 l30 weights"}
WEIGHTS_MIB=${WEIGHTS_MIB:-2048}
WORK=${WORK:-/var/tmp/lsm-convert-bench}
OUT=${OUT:-$here/results}
LSMCTL=${LSMCTL:-$repo/target/release/lsmctl}
CACHE=/var/cache/lsm-images
SHM=${SHM:-/dev/shm}

[ -x "$LSMCTL" ] || (cd "$repo" && cargo build --release -p lsm-tools)
for t in umoci skopeo; do command -v $t >/dev/null || { echo "needs $t (tests/install-deps.sh)" >&2; exit 1; }; done

echo "convert bench: building/finding the images (cached in $CACHE)" >&2
SRC=$(bash "$repo/tests/support/debian-images.sh" "$CACHE/debian-v1")
OCI=$CACHE/convert-v1-$WEIGHTS_MIB/oci
if [ ! -f "$CACHE/convert-v1-$WEIGHTS_MIB/done" ]; then
  rm -rf "$CACHE/convert-v1-$WEIGHTS_MIB" && mkdir -p "$OCI"
  cp -al "$SRC/." "$OCI/"
  rm "$OCI/index.json" && cp "$SRC/index.json" "$OCI/index.json" # index.json is rewritten
  python3 "$here/convert_images.py" "$OCI" "$WEIGHTS_MIB"
  touch "$CACHE/convert-v1-$WEIGHTS_MIB/done"
fi

rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
trap 'rm -rf "$WORK"' EXIT
# unpacked bytes and layer count of an image
facts() { # TAG -> "LAYERS BYTES"
  python3 - "$OCI" "$1" <<'EOF'
import gzip, json, os, sys
oci, tag = sys.argv[1:]
idx = json.load(open(os.path.join(oci, "index.json")))
m = next(x for x in idx["manifests"] if x.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(os.path.join(oci, "blobs/sha256", m["digest"][7:])))
total = 0
for l in man["layers"]:
    with gzip.open(os.path.join(oci, "blobs/sha256", l["digest"][7:])) as f:
        while b := f.read(8 << 20):
            total += len(b)
print(len(man["layers"]), total)
EOF
}
timed() { # FILE CMD... : appends "seconds peak_kb" to FILE
  local f=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/t" "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
  cat "$WORK/t" >>"$f"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

{
  echo "| image | layers | unpacked MB | lsmctl convert s | MB/s | convert, work tree on disk s | MB/s | peak RSS MB | umoci unpack s | MB/s | skopeo copy s | convert / umoci | convert on disk / umoci |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$WORK/table"
for img in $IMAGES; do
  read -r nl bytes < <(facts "$img")
  for r in $(seq "$RUNS"); do
    echo "convert bench: $img run $r/$RUNS" >&2
    rm -rf "$WORK/c" "$WORK/u" "$WORK/s"
    timed "$WORK/$img.convert" "$LSMCTL" convert -q --no-reuse --tag "$img" "$OCI" "$WORK/c"
    rm -rf "$WORK/c"
    mkdir -p "$WORK/disk"
    timed "$WORK/$img.shm" "$LSMCTL" convert -q --no-reuse --work-dir "$WORK/disk" --tag "$img" "$OCI" "$WORK/c"
    rm -rf "$WORK/c"
    timed "$WORK/$img.umoci" umoci unpack --image "$OCI:$img" "$WORK/u"
    rm -rf "$WORK/u"
    timed "$WORK/$img.skopeo" skopeo copy -q "oci:$OCI:$img" "oci:$WORK/s:$img"
    rm -rf "$WORK/s"
  done
  c=$(cut -d' ' -f1 "$WORK/$img.convert" | median)
  m=$(cut -d' ' -f1 "$WORK/$img.shm" | median)
  rss=$(cat "$WORK/$img.convert" "$WORK/$img.shm" | cut -d' ' -f2 | sort -g | tail -1)
  u=$(cut -d' ' -f1 "$WORK/$img.umoci" | median)
  s=$(cut -d' ' -f1 "$WORK/$img.skopeo" | median)
  awk -v i="$img" -v n="$nl" -v b="$bytes" -v c="$c" -v m="$m" -v rss="$rss" -v u="$u" -v s="$s" 'BEGIN {
    mb = b / 1e6
    printf "| %s | %d | %.0f | %.1f | %.0f | %.1f | %.0f | %.0f | %.1f | %.0f | %.1f | %.2f× | %.2f× |\n", i, n, mb, c, mb / c, m, mb / m, rss / 1024, u, mb / u, s, c / u, m / u
  }' >>"$WORK/table"
done
{
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $RUNS runs per tool, medians (peak RSS: max)."
  echo "Load average at the start: $load_start; at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  cat "$WORK/table"
} | tee "$OUT/convert.md"
