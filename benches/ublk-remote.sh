#!/usr/bin/env bash
# Remote cold reads over ublk, QD1 vs QD32, in the qemu TCG VM (this host's kernel has no ublk):
# kernel-setup/vm-test's `ublk-qd` phase. The layer's blob sits on a device whose every read is
# 5 ms late (dm-delay, standing in for a registry 5 ms away: same round trip per fetch, no HTTP
# server competing for the VM's emulated CPU), lsmd starts afresh per run (empty chunk cache, no
# prefetch) and fio (libaio, O_DIRECT) reads 4 KiB at random from an image of 4 KiB chunks,
# never a block twice: every read is a fetch. 100 reads at QD1, 1600 at QD32, 3 runs each,
# medians. Under TCG every
# instruction is emulated, so absolute IOPS are far below a real machine's; the ratio is what
# this measures (issue 16's target: QD32 >= 12x QD1 on every frontend; benches/nbd-vs.sh has
# the NBD and FUSE rows on the host).
# Usage: bash benches/ublk-remote.sh        (takes ~5 min: one VM boot)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(LSM_VM_ONLY=ublk-qd bash kernel-setup/vm-test 2>&1) || { echo "$out" | tail -20; exit 1; }
echo "$out" | grep "LSM-VM: ublk" | sed 's/^.*LSM-VM: //'
