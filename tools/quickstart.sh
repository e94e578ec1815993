#!/usr/bin/env bash
# Quick start: install what is needed, build, then make a small layered image from a bundled
# sample (this repository's own docs and sources in an ext4 filesystem), stack a change on it
# through the writable upper layer, commit, inspect, verify, and export it back bit for bit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tests/install-deps.sh
cargo build --release -q -p lsm-tools
L="${CARGO_TARGET_DIR:-$repo/target}/release/lsmctl"
w=${LSM_QUICKSTART_DIR:-$repo/target/quickstart}
rm -rf "$w"; mkdir -p "$w/tree"
cp -a README.md FORMAT.md blockfmt lsmd tools "$w/tree/"
echo "== 1. a 64 MiB ext4 image of the bundled sample tree"
truncate -s 64M "$w/base.raw"
mkfs.ext4 -q -F -d "$w/tree" "$w/base.raw"
echo "== 2. import it as a layer blob (prints the blob's OCI descriptor)"
"$L" import -q "$w/base.raw" -o "$w/base.blob"
echo "== 3. an image: that layer plus an empty writable upper layer"
"$L" create "$w/image.json" --layer "$w/base.blob"
echo "== 4. change the filesystem (debugfs adds a file) and write the change into the upper layer"
cp "$w/base.raw" "$w/changed.raw"
echo "hello from the upper layer" > "$w/hello.txt"
debugfs -w -R "write $w/hello.txt /hello.txt" "$w/changed.raw" >/dev/null 2>&1
"$L" write -q "$w/image.json" --from "$w/changed.raw"
echo "== 5. commit the upper layer into a second layer"
"$L" commit "$w/image.json" -o "$w/change.blob"
echo "== 6. inspect and verify"
"$L" inspect "$w/image.json"
"$L" verify "$w/image.json"
echo "== 7. export the two-layer image and compare with the changed filesystem"
"$L" export -q "$w/image.json" -o "$w/export.raw"
cmp "$w/changed.raw" "$w/export.raw" && echo "export is identical to the changed filesystem"
debugfs -R "cat /hello.txt" "$w/export.raw" 2>/dev/null
echo "done: files are in $w"
