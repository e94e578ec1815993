#!/usr/bin/env bash
# lsmd against the reference NBD servers, same data, same machine, same run, Unix sockets:
#   lsmd      a 3-layer lsm image (+ upper layer for writes)
#   qemu-nbd  the same content as a 3-deep qcow2 backing chain (base <- mid <- top)
#   nbdkit    the final content as one flat raw file (`nbdkit file`)
# fio's nbd engine drives each: 4k randread QD1 and QD32, 1M seqread QD8, 4k randwrite QD32.
# Data: 1 GiB (BENCH_MIB) of fio's 50%-compressible buffers; layers 2 and 3 each rewrite 10%.
# lsmd's decoded-chunk cache holds the disk and its overwritten chunks (BENCH_CACHE_MIB, 2x), as the page cache
# holds the others' files; every server is warmed with one full read before its reads.
# Usage: bash benches/nbd-vs.sh [workdir]     (BENCH_SECS per row, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
for t in qemu-nbd nbdkit; do
  command -v $t >/dev/null || { apt-get install -y -qq qemu-utils nbdkit >/dev/null; break; }
done
cargo build --release -q -p lsmd -p lsm-tools
ROOT=$PWD
L=${CARGO_TARGET_DIR:-$ROOT/target}/release/lsmctl
D=${CARGO_TARGET_DIR:-$ROOT/target}/release/lsmd
MIB=${BENCH_MIB:-1024}
CACHE_MIB=${BENCH_CACHE_MIB:-$((MIB * 2))}
SECS=${BENCH_SECS:-10}
w=${1:-/var/tmp/lsm-bench-nbd}
mkdir -p "$w"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# --- data (cached across runs in $w) ----------------------------------------------------------
if [ ! -f "$w/raw2" ] || [ "$(stat -c %s "$w/raw2")" -ne $((MIB << 20)) ]; then
  echo "generating $MIB MiB of data and its layers in $w ..."
  rm -f "$w"/raw* "$w"/*.blob "$w"/*.qcow2
  fio --name=gen --rw=write --bs=1M --size=${MIB}M --filename="$w/raw0" \
    --buffer_compress_percentage=50 --refill_buffers --randseed=1 >/dev/null
  python3 - "$w" "$MIB" <<'PY'
import os, random, shutil, sys
w, mib = sys.argv[1], int(sys.argv[2])
src = w + '/raw0'
for n in (1, 2):
    dst = f'{w}/raw{n}'
    shutil.copyfile(src, dst)
    r = random.Random(n)
    with open(dst, 'r+b') as f:
        for m in r.sample(range(mib), mib // 10):      # 10% of the MiBs rewritten
            f.seek(m << 20)
            half = r.randbytes(1 << 19)
            f.write(half + half[::-1])
    src = dst
PY
  "$L" import -q "$w/raw0" -o "$w/l0.blob" >/dev/null
  "$L" create "$w/img.json" --layer "$w/l0.blob" --read-only >/dev/null
  "$L" import -q "$w/raw1" --base "$w/img.json" --add-to "$w/img.json" -o "$w/l1.blob" >/dev/null
  "$L" import -q "$w/raw2" --base "$w/img.json" --add-to "$w/img.json" -o "$w/l2.blob" >/dev/null
  qemu-img convert -O qcow2 "$w/raw0" "$w/base.qcow2"
  qemu-img convert -O qcow2 -B "$w/base.qcow2" -F qcow2 "$w/raw1" "$w/mid.qcow2"
  qemu-img convert -O qcow2 -B "$w/mid.qcow2" -F qcow2 "$w/raw2" "$w/top.qcow2"
fi

# Fresh writable state each run: lsm upper layer, qcow2 top, raw copy.
rm -rf "$w/run"; mkdir -p "$w/run"
python3 - "$w/img.json" "$w/run/img.json" "$w/run/img.upper" $((CACHE_MIB << 20)) <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
base = sys.argv[1].rsplit('/', 1)[0]
for l in c['layers']:
    src = l['source']['local']
    l['source']['local'] = src if src.startswith('/') else base + '/' + src
c['upper'] = sys.argv[3]
c['cache_bytes'] = int(sys.argv[4])
json.dump(c, open(sys.argv[2], 'w'))
PY
cp "$w/top.qcow2" "$w/run/top.qcow2"
qemu-img rebase -u -b "$w/mid.qcow2" -F qcow2 "$w/run/top.qcow2"
cp --sparse=always "$w/raw2" "$w/run/flat.raw"

start_server() { # name
  local s="$w/run/$1.sock"
  rm -f "$s"
  case $1 in
    lsmd) "$D" serve --config "$w/run/img.json" --socket "$s" 2>"$w/run/lsmd.log" & ;;
    qemu-nbd) qemu-nbd -f qcow2 --shared=8 --persistent -k "$s" "$w/run/top.qcow2" & ;;
    nbdkit) nbdkit -f -U "$s" file "$w/run/flat.raw" & ;;
  esac
  pids+=($!)
  for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
  nbdcopy "nbd+unix:///?socket=$s" null: # warm: one full read
}

cpu_ticks() { # pid -> utime+stime of the whole process, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

run_fio() { # server rw bs qd [fsync] -> "iops MiB/s mean_lat_us server_cpu_%"
  local t0; t0=$(cpu_ticks "${pids[-1]}")
  fio --ioengine=nbd --uri="nbd+unix:///?socket=$w/run/$1.sock" --name=b --rw=$2 --bs=$3 \
    --iodepth=$4 --fsync=${5:-0} --size=${MIB}M --time_based --runtime=$SECS --ramp_time=1 \
    --randrepeat=1 --norandommap --output-format=json | python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]   # the nbd engine prints a line before the JSON
op = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
print("%.0f %.1f %.1f" % (op["iops"], op["bw"] / 1024, op["lat_ns"]["mean"] / 1000))' | tr '\n' ' '
  echo $(( ($(cpu_ticks "${pids[-1]}") - t0) * 100 / $(getconf CLK_TCK) / (SECS + 1) ))
}

rows=("randread 4k 1" "randread 4k 32" "read 1M 8" "randwrite 4k 32" "randwrite 4k 32 32")
declare -A res
for srv in lsmd qemu-nbd nbdkit; do
  start_server $srv
  for r in "${rows[@]}"; do
    set -- $r
    res[$srv,$r]=$(run_fio $srv "$@")
    echo "$srv $r: ${res[$srv,$r]}" >&2
  done
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
done

echo
echo "fio nbd engine, ${SECS}s per row, $MIB MiB disk, $(nproc) cores shared by fio and the server"
echo "row = rw bs iodepth [fsync every N]; per server: IOPS, MiB/s, mean latency, server CPU %"
printf '%-22s %28s %28s %28s %9s %8s\n' row "lsmd" "qemu-nbd" "nbdkit" "lsm/qemu" "lsm/kit"
for r in "${rows[@]}"; do
  read -r li lb ll lc <<<"${res[lsmd,$r]}"
  read -r qi qb ql qc <<<"${res[qemu-nbd,$r]}"
  read -r ki kb kl kc <<<"${res[nbdkit,$r]}"
  printf '%-22s %7s %6s %6sus %4s%% %7s %6s %6sus %4s%% %7s %6s %6sus %4s%% %9s %8s\n' "$r" \
    "$li" "$lb" "$ll" "$lc" "$qi" "$qb" "$ql" "$qc" "$ki" "$kb" "$kl" "$kc" \
    "$(echo "scale=2; $li / $qi" | bc)" "$(echo "scale=2; $li / $ki" | bc)"
done
read -r _ _ ll _ <<<"${res[lsmd,randread 4k 1]}"
read -r _ _ kl _ <<<"${res[nbdkit,randread 4k 1]}"
echo "4k QD1 mean latency lsmd/nbdkit: $(echo "scale=2; $ll / $kl" | bc)"
