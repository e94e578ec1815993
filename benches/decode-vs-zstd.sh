#!/usr/bin/env bash
# Chunk decode throughput vs `zstd -b` on the same bytes, one core.
# Runs the criterion bench (which writes its sample to target/bench-sample.bin), then zstd's own
# benchmark on that file at the same level, both with independent 128 KiB blocks (as lsm stores
# them) and as one stream (zstd's best case).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v zstd >/dev/null || apt-get install -y -qq zstd
cargo bench -p lsm-benches --bench chunk_decode -- --warm-up-time 1 --measurement-time 3 2>&1 |
  grep -E 'sample of|chunks, ratio|^chunk_decode/|thrpt:' | grep -v '%'
sample=target/bench-sample.bin
echo "zstd -b6 -B128K (independent 128 KiB blocks):"
taskset -c 0 zstd -b6 -i3 -B131072 "$sample" 2>&1 | tr '\r' '\n' | grep 'MB/s,' | tail -1
echo "zstd -b6 (one stream):"
taskset -c 0 zstd -b6 -i3 "$sample" 2>&1 | tr '\r' '\n' | grep 'MB/s,' | tail -1
