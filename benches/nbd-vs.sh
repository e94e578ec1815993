#!/usr/bin/env bash
# lsmd against the reference NBD servers, same data, same machine, same run, Unix sockets:
#   lsmd      a 3-layer lsm image (+ upper layer for writes)
#   qemu-nbd  the same content as a 3-deep qcow2 backing chain (base <- mid <- top)
#   nbdkit    the final content as one flat raw file (`nbdkit file`)
# fio's nbd engine drives each: 4k randread QD1 and QD32, 1M seqread QD8, 4k randwrite QD32.
# Data: 1 GiB (BENCH_MIB) of fio's 50%-compressible buffers; layers 2 and 3 each rewrite 10%.
# lsmd's decoded-chunk cache holds the disk and its overwritten chunks (BENCH_CACHE_MIB, 2x), as the page cache
# holds the others' files; every server is warmed with one full read before its reads.
# Every row runs BENCH_REPS times (default 3), interleaved across servers; the table shows the
# median with min–max beside it. Rows: 4k randread QD1/QD32, the same QD32 over 4 connections
# (fio --numjobs=4), 1M seqread QD8, 4k randwrite QD32 without and with fsync every 32; idle CPU;
# remote rows (lsmd only): the layers 5 ms away over HTTP Range, empty cache, QD1 vs QD32 over
# NBD and over the FUSE file.
# Usage: bash benches/nbd-vs.sh [workdir]     (BENCH_SECS per row, default 10)
#        BENCH_ROWS=randwrite bash benches/nbd-vs.sh   only the rows matching a regex, no table
#                                                     (BENCH_ROWS=remote: the remote rows alone)
#        UPDATE_README=1 bash benches/nbd-vs.sh   also rewrites README's table (between markers)
#        BENCH_LSMD=/path/to/lsmd ...              another lsmd binary (an A/B against an older build)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
for t in qemu-nbd nbdkit; do
  command -v $t >/dev/null || { apt-get install -y -qq qemu-utils nbdkit >/dev/null; break; }
done
cargo build --release -q -p lsmd -p lsm-tools
cargo build --release -q -p lsm-benches --bin range-server
ROOT=$PWD
L=${CARGO_TARGET_DIR:-$ROOT/target}/release/lsmctl
D=${BENCH_LSMD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/lsmd}
RS=${CARGO_TARGET_DIR:-$ROOT/target}/release/range-server
MIB=${BENCH_MIB:-1024}
CACHE_MIB=${BENCH_CACHE_MIB:-$((MIB * 2))}
SECS=${BENCH_SECS:-10}
REPS=${BENCH_REPS:-3}
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

declare -A pid
start_server() { # name: starts it on $w/run/NAME.sock and warms it with one full read
  local s="$w/run/$1.sock"
  rm -f "$s"
  case $1 in
    lsmd) "$D" serve --config "$w/run/img.json" --socket "$s" 2>"$w/run/lsmd.log" & ;;
    qemu-nbd) qemu-nbd -f qcow2 --shared=8 --persistent -k "$s" "$w/run/top.qcow2" & ;;
    nbdkit) nbdkit -f -U "$s" file "$w/run/flat.raw" & ;;
  esac
  pid[$1]=$!; pids+=($!)
  for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
  nbdcopy "nbd+unix:///?socket=$s" null: # warm: one full read
}

cpu_ticks() { # pid -> utime+stime of the whole process, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

fio_summary() { # fio JSON on stdin -> "iops MiB/s mean_lat_us"
  python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]   # the nbd engine prints a line before the JSON
op = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
print("%.0f %.1f %.1f" % (op["iops"], op["bw"] / 1024, op["lat_ns"]["mean"] / 1000))' | tr '\n' ' '
}

run_fio() { # server-pid target rw bs qd fsync jobs secs [fio args] -> "iops MiB/s lat_us cpu_%"
  local p=$1 target=$2 rw=$3 bs=$4 qd=$5 fs=$6 jobs=$7 secs=$8; shift 8
  local t0; t0=$(cpu_ticks "$p")
  fio "$@" $target --name=b --rw=$rw --bs=$bs --iodepth=$qd --fsync=$fs --numjobs=$jobs \
    --group_reporting --size=${MIB}M --time_based --runtime=$secs --ramp_time=1 \
    --randrepeat=1 --norandommap --output-format=json | fio_summary
  echo $(( ($(cpu_ticks "$p") - t0) * 100 / $(getconf CLK_TCK) / (secs + 1) ))
}

cold_fio() { # server-pid target qd count [fio args] -> "iops MiB/s lat_us cpu_%"
  # `count` 4k reads at random, each in a chunk (128 KiB) no earlier read touched: all cold.
  local p=$1 target=$2 qd=$3 n=$4; shift 4
  local t0 s0; t0=$(cpu_ticks "$p"); s0=$(date +%s%N)
  fio "$@" $target --name=b --rw=randread --bs=4k --blockalign=128k --iodepth=$qd \
    --size=${MIB}M --number_ios=$n --randrepeat=1 --output-format=json | fio_summary
  echo $(( ($(cpu_ticks "$p") - t0) * 100 * 1000000000 / $(getconf CLK_TCK) / ($(date +%s%N) - s0) ))
}

nbd_fio() { # server rw bs qd fsync jobs
  run_fio "${pid[$1]}" "--uri=nbd+unix:///?socket=$w/run/$1.sock" "$2" "$3" "$4" "$5" "$6" "$SECS" \
    --ioengine=nbd
}

# rw bs iodepth fsync-every jobs (each job its own connection)
rows=("randread 4k 1 0 1" "randread 4k 32 0 1" "randread 4k 32 0 4" "read 1M 8 0 1"
      "randwrite 4k 32 0 1" "randwrite 4k 32 32 1")
if [ -n "${BENCH_ROWS:-}" ]; then # a regex: run only the matching rows
  kept=(); for r in "${rows[@]}"; do [[ $r =~ $BENCH_ROWS ]] && kept+=("$r"); done; rows=("${kept[@]}")
fi
servers=(lsmd qemu-nbd nbdkit)
results="$w/run/results.tsv"
: >"$results"
if [ ${#rows[@]} -eq 0 ]; then servers=(); fi
for srv in "${servers[@]}"; do start_server $srv; done
# Interleaved: every repetition runs each row on each server in turn, so a slow moment of the
# machine (other builds share these cores) spreads over all servers instead of one.
for rep in $(seq "$REPS"); do
  for r in "${rows[@]}"; do
    for srv in "${servers[@]}"; do
      out=$(nbd_fio $srv $r)
      echo "$srv	$r	$rep	$out" | tee -a "$results" >&2
    done
  done
done
# Idle: server CPU over 5 s with its connections closed (lsmd polls only while a client talks).
for srv in "${servers[@]}"; do
  t0=$(cpu_ticks "${pid[$srv]}"); sleep 5
  echo "$srv	idle	1	0 0 0 $(( ($(cpu_ticks "${pid[$srv]}") - t0) * 100 / $(getconf CLK_TCK) / 5 ))" >>"$results"
done
for srv in "${servers[@]}"; do kill "${pid[$srv]}"; done
wait 2>/dev/null || true; pids=()

# --- remote rows: the layers over HTTP(S) Range 5 ms away, empty cache, lsmd only -------------
# A Range file server that answers each request 5 ms after it arrived (benches/remote/
# range_server.rs: Rust, a thread per connection, so the peer is not the ceiling at QD32 on
# these 2 shared cores; the Python server + delaying proxy it replaced capped near 800 GETs/s);
# lsmd starts afresh for every run (no host cache, empty chunk cache), and
# fio reads 4k at random at QD1 and QD32 over NBD and over the FUSE file (libaio, O_DIRECT),
# each read in a chunk no earlier read touched (so every one is a fetch): BENCH_REMOTE_IOS
# reads at QD1 (default 200), 16× that at QD32.
if [ -n "${BENCH_ROWS:-}" ] && ! [[ remote =~ $BENCH_ROWS ]]; then cat "$results"; exit 0; fi
RIOS=${BENCH_REMOTE_IOS:-200}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PP=$(port)
"$RS" 127.0.0.1:$PP "$w" 5 & pids+=($!)
sleep 1
python3 - "$w/run/img.json" "$w/run/remote.json" "http://127.0.0.1:$PP" <<'PY'
import json, os, sys
c = json.load(open(sys.argv[1]))
for l in c['layers']:
    l['source'] = {'http': {'url': sys.argv[3] + '/' + os.path.basename(l['source']['local']),
                            'insecure': True}}
c.pop('upper', None)
json.dump(c, open(sys.argv[2], 'w'))
PY
mkdir -p "$w/run/fuse"
remote_run() { # nbd|fuse qd count -> result line
  local s="$w/run/remote.sock" p out
  rm -f "$s"
  if [ "$1" = nbd ]; then
    "$D" serve --config "$w/run/remote.json" --read-only --prefetch none --socket "$s" \
      2>>"$w/run/remote.log" & p=$!
    for _ in $(seq 200); do [ -S "$s" ] && break; sleep 0.05; done
    out=$(cold_fio $p "--uri=nbd+unix:///?socket=$s" "$2" "$3" --ioengine=nbd)
  else
    "$D" serve --config "$w/run/remote.json" --read-only --prefetch none --fuse "$w/run/fuse" \
      2>>"$w/run/remote.log" & p=$!
    for _ in $(seq 200); do [ -f "$w/run/fuse/remote" ] && break; sleep 0.05; done
    out=$(cold_fio $p "--filename=$w/run/fuse/remote" "$2" "$3" --ioengine=libaio --direct=1)
  fi
  kill $p; wait $p 2>/dev/null || true
  echo "$out"
}
for rep in $(seq "$REPS"); do
  for fe in nbd fuse; do
    for qd in 1 32; do
      out=$(remote_run $fe $qd $(( qd == 1 ? RIOS : RIOS * 16 )))
      echo "lsmd-$fe	remote randread 4k $qd	$rep	$out" | tee -a "$results" >&2
    done
  done
done

if [ -n "${BENCH_ROWS:-}" ]; then cat "$results"; exit 0; fi
echo
python3 benches/nbd-vs-table.py "$results" "$SECS" "$RIOS" "$MIB" "$(nproc)" | tee "$w/run/table.md"
if [ "${UPDATE_README:-0}" = 1 ]; then
  python3 - README.md "$w/run/table.md" <<'PY'
import sys
readme, table = sys.argv[1], open(sys.argv[2]).read()
s = open(readme).read()
a, b = '<!-- nbd-vs:begin -->\n', '<!-- nbd-vs:end -->'
i, j = s.index(a) + len(a), s.index(b)
open(readme, 'w').write(s[:i] + table + s[j:])
PY
  echo "README.md updated" >&2
fi
