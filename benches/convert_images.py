#!/usr/bin/env python3
"""Adds the conversion benchmark's images to an OCI image layout (benches/convert.sh).

Usage: convert_images.py LAYOUT WEIGHTS_MIB

LAYOUT must hold `base` (debootstrap minbase, 1 layer) and `py` (+ python3, 2 layers), as
tests/support/debian-images.sh makes them. Adds, deterministically (seeded, gzip mtime 0):
  l12     — py + 10 generated layers;  l30 — py + 28 generated layers.
  Each generated layer: ~3 MB in 40 files (text-like and random), a rewritten shared file, a
  whiteout of a file two layers down, an opaque directory every 5th layer, a hard link and a
  symlink — what an application Dockerfile's RUN/COPY steps leave.
  weights — base + one layer holding one WEIGHTS_MIB file of float32-like data (random
  mantissas, a narrow exponent range: zstd saves only a few per cent, like real weights).
"""
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile

layout, weights_mib = sys.argv[1], int(sys.argv[2])
blobs = os.path.join(layout, "blobs", "sha256")


def blob(digest):
    return os.path.join(blobs, digest.split(":", 1)[1])


def put(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob(d), "wb") as f:
        f.write(data)
    return d, len(data)


index_path = os.path.join(layout, "index.json")
index = json.load(open(index_path))


def manifest_of(tag):
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.load(open(blob(m["digest"])))
    raise SystemExit(f"{layout}: no image tagged {tag}")


def tag_image(tag, src_tag, new_layers):
    """new_layers: (gzip descriptor dict, diff_id) pairs appended to src_tag's layers."""
    m = manifest_of(src_tag)
    cfg = json.load(open(blob(m["config"]["digest"])))
    for desc, diff_id in new_layers:
        m["layers"].append(desc)
        cfg["rootfs"]["diff_ids"].append(diff_id)
        cfg.setdefault("history", []).append({"created_by": f"bench layer {diff_id[7:19]}"})
    cd, cs = put(json.dumps(cfg, sort_keys=True).encode())
    m["config"] = {"mediaType": m["config"]["mediaType"], "digest": cd, "size": cs}
    md, ms = put(json.dumps(m, sort_keys=True).encode())
    index["manifests"] = [
        x for x in index["manifests"]
        if x.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ]
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })


def info(name, size=0, kind=tarfile.REGTYPE, mode=0o644, link=""):
    t = tarfile.TarInfo(name)
    t.size, t.type, t.mode, t.linkname = size, kind, mode, link
    t.mtime, t.uid, t.gid, t.uname, t.gname = 1700000000, 0, 0, "root", "root"
    return t


WORDS = [b"lorem", b"ipsum", b"layer", b"python", b"config", b"module", b"import", b"data"]


def gen_layer(k):
    r = random.Random(k)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(info("opt/", kind=tarfile.DIRTYPE, mode=0o755))
        t.addfile(info("opt/app/", kind=tarfile.DIRTYPE, mode=0o755))
        if k >= 2:  # a whiteout of a file two layers down
            t.addfile(info(f"opt/app/layer{k - 2}/.wh.f0"))
        if k % 5 == 4:  # an opaque directory
            t.addfile(info("opt/app/cache/", kind=tarfile.DIRTYPE, mode=0o755))
            t.addfile(info("opt/app/cache/.wh..wh..opq"))
        if k % 5 in (3, 4):
            body = b"cache %d\n" % k
            t.addfile(info(f"opt/app/cache/c{k}", len(body)), io.BytesIO(body))
        d = f"opt/app/layer{k}"
        t.addfile(info(d + "/", kind=tarfile.DIRTYPE, mode=0o755))
        for i in range(40):
            n = r.randint(1 << 10, 150 << 10)
            if i % 3 == 0:
                body = r.randbytes(n)
            else:
                body = b" ".join(r.choice(WORDS) for _ in range(n // 6))[:n]
            t.addfile(info(f"{d}/f{i}", len(body), mode=0o755 if i % 7 == 0 else 0o644),
                      io.BytesIO(body))
        t.addfile(info(f"{d}/hard", kind=tarfile.LNKTYPE, link=f"{d}/f1"))
        t.addfile(info(f"{d}/link", kind=tarfile.SYMTYPE, link="f2", mode=0o777))
        body = b"shared config written by layer %d\n" % k
        t.addfile(info("opt/app/shared.cfg", len(body)), io.BytesIO(body))
    data = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    gz = gzip.compress(data, compresslevel=6, mtime=0)
    d, s = put(gz)
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": s}, diff_id


class Weights(io.RawIOBase):
    """WEIGHTS_MIB of float32-like bytes, 64 MiB at a time, from a seeded generator."""

    def __init__(self, mib):
        self.left = mib << 20
        self.r = random.Random(42)
        self.buf = b""
        top = bytes((0x3C | (x & 3)) | (x & 0x80) for x in range(256))
        self.top = top

    def readable(self):
        return True

    def readinto(self, b):
        if not self.buf:
            if self.left == 0:
                return 0
            n = min(self.left, 64 << 20)
            chunk = bytearray(self.r.randbytes(n))
            chunk[3::4] = bytes(chunk[3::4]).translate(self.top)
            self.buf = bytes(chunk)
            self.left -= n
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def weights_layer(mib):
    tmp = os.path.join(blobs, ".weights.partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        gz = subprocess.Popen(["gzip", "-1", "-n"], stdin=subprocess.PIPE, stdout=out)

        class Tee(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                h.update(b)
                gz.stdin.write(b)
                return len(b)

        with tarfile.open(fileobj=Tee(), mode="w|", format=tarfile.PAX_FORMAT) as t:
            t.addfile(info("models/", kind=tarfile.DIRTYPE, mode=0o755))
            t.addfile(info("models/weights.bin", mib << 20),
                      io.BufferedReader(Weights(mib), 8 << 20))
        gz.stdin.close()
        if gz.wait() != 0:
            raise SystemExit("gzip failed")
    d = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(8 << 20):
            d.update(chunk)
    digest = "sha256:" + d.hexdigest()
    size = os.path.getsize(tmp)
    os.rename(tmp, blob(digest))
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size}, "sha256:" + h.hexdigest()


layers = [gen_layer(k) for k in range(28)]
tag_image("l12", "py", layers[:10])
tag_image("l30", "py", layers)
tag_image("weights", "base", [weights_layer(weights_mib)])
tmp = index_path + ".tmp"
with open(tmp, "w") as f:
    json.dump(index, f, indent=1)
os.rename(tmp, index_path)
