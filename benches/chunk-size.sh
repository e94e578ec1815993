#!/usr/bin/env bash
# The chunk-size trade-off: layer size (and ratio to `zstd -3` over the image's non-zero blocks)
# against bytes decoded per random 4 KiB read, for chunk windows 16K..1M and zstd levels 3 and 6,
# on a 256 MiB ext4 image holding ~170 MiB of /usr/share.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p lsm-tools
L=${CARGO_TARGET_DIR:-target}/release/lsmctl
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
python3 - "$w/tree" <<'PY'
import os, subprocess, sys
dst = sys.argv[1]; os.makedirs(dst); used = 0
for n in sorted(os.listdir('/usr/share')):
    p = '/usr/share/' + n
    kib = int(subprocess.check_output(['du', '-sk', '--apparent-size', p]).split()[0])
    if used + kib // 1024 + 1 > 170: continue
    subprocess.check_call(['cp', '-a', p, dst]); used += kib // 1024 + 1
PY
truncate -s 256M "$w/v1.raw"
mkfs.ext4 -q -F -d "$w/tree" "$w/v1.raw"
python3 - "$w/v1.raw" "$w/nonzero" <<'PY'
import sys
d = open(sys.argv[1], 'rb').read()
open(sys.argv[2], 'wb').write(b''.join(d[i:i+4096] for i in range(0, len(d), 4096) if d[i:i+4096].count(0) != 4096))
PY
yard=$(zstd -3 -q -c --single-thread "$w/nonzero" | wc -c)
echo "zstd -3 over non-zero blocks: $yard bytes"
printf '%-8s %-6s %12s %8s %22s %10s\n' chunk level blob_bytes ratio decoded_per_4k_read import_s
for cs in 16K 32K 64K 128K 256K 1M; do
  for lv in 3 6; do
    s=$(date +%s.%N)
    $L import -q --chunk-size $cs --level $lv "$w/v1.raw" -o "$w/c.blob" >/dev/null
    e=$(date +%s.%N)
    size=$(stat -c %s "$w/c.blob")
    mean=$($L inspect --json "$w/c.blob" | python3 -c 'import json,sys; v=json.load(sys.stdin)[0]; print(v["chunk_raw_bytes"]//max(v["chunks"],1))')
    printf '%-8s %-6s %12d %8.3f %22d %10.2f\n' $cs $lv $size "$(echo "$size / $yard" | bc -l)" $mean "$(echo "$e - $s" | bc -l)"
  done
done
