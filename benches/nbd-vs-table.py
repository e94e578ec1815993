#!/usr/bin/env python3
"""Turns benches/nbd-vs.sh's results (one line per run: server, row, repetition, "IOPS MiB/s
mean-latency-µs server-CPU-%") into README's markdown table: medians with min–max, ratios of
medians against the best peer, and the derived targets (4 connections / 1, remote QD32 / QD1).

Usage: nbd-vs-table.py RESULTS.tsv SECS REMOTE_IOS MIB CORES
"""
import statistics
import sys
from collections import defaultdict

path, secs, rios, mib, cores = sys.argv[1:6]
runs = defaultdict(list)
order = []
for line in open(path):
    srv, row, _rep, vals = line.rstrip("\n").split("\t")
    iops, mibs, lat, cpu = (float(x) for x in vals.split())
    runs[(srv, row)].append((iops, mibs, lat, cpu))
    if row not in order:
        order.append(row)


def med(srv, row, i=0):
    return statistics.median(r[i] for r in runs[(srv, row)])


def cell(srv, row):
    rs = runs.get((srv, row))
    if not rs:
        return "–"
    iops = [r[0] for r in rs]
    lo, hi = min(iops), max(iops)
    bs_m = " (%.0f MiB/s)" % med(srv, row, 1) if row.split()[1] == "1M" else ""
    return "%s%s [%s–%s], %.1f µs, %.0f %%" % (
        f"{med(srv, row):,.0f}".replace(",", " "), bs_m,
        f"{lo:,.0f}".replace(",", " "), f"{hi:,.0f}".replace(",", " "),
        med(srv, row, 2), med(srv, row, 3))


def label(row):
    rw, bs, qd, fs, jobs = row.split()
    s = f"{bs} {rw} QD{qd}"
    if fs != "0":
        s += f", fsync every {fs}"
    if jobs != "1":
        s += f", {jobs} connections"
    return s


peers = ["qemu-nbd", "nbdkit"]
out = []
out.append(f"fio nbd engine over Unix sockets, {secs} s per run, {mib} MiB disk, {cores} cores shared "
           f"by fio and the server (and, while this ran, other builds); each row run "
           f"{len(runs[('lsmd', order[0])])}× interleaved across servers. Cells: median IOPS "
           f"[min–max], mean latency, server CPU %; ratio = lsmd median / best peer median.\n")
out.append("| row | lsmd | qemu-nbd | nbdkit | lsmd / best peer |")
out.append("| --- | --- | --- | --- | --- |")
for row in order:
    if row == "idle" or row.startswith("remote"):
        continue
    best = max(med(p, row) for p in peers if runs.get((p, row)))
    out.append(f"| {label(row)} | {cell('lsmd', row)} | {cell('qemu-nbd', row)} | "
               f"{cell('nbdkit', row)} | **{med('lsmd', row) / best:.2f}** |")
if runs.get(("lsmd", "idle")):
    idle = ["%.0f %%" % med(s, "idle", 3) for s in ["lsmd"] + peers]
    out.append("| idle: server CPU, 5 s without a client | " + " | ".join(idle) + " | |")
one, four = "randread 4k 32 0 1", "randread 4k 32 0 4"
if runs.get(("lsmd", four)):
    out.append("")
    out.append("4 connections / 1 connection at QD32 (target ≥ 1.6): lsmd **%.2f**, qemu-nbd %.2f, "
               "nbdkit %.2f." % tuple(med(s, four) / med(s, one) for s in ["lsmd"] + peers))
remote = [r for r in order if r.startswith("remote")]
if remote:
    out.append("")
    out.append(f"Remote (lsmd only; layers over HTTP Range from a server that answers each request "
               f"5 ms after it arrived (benches/remote/range_server.rs), empty cache, "
               f"lsmd restarted per run; {rios} reads at QD1, {int(rios) * 16} at QD32, each in a "
               f"chunk no earlier read touched, so every read is a fetch): 4k randread IOPS "
               f"median [min–max], mean latency, lsmd CPU %.\n")
    out.append("| frontend | QD1 | QD32 | QD32 / QD1 (target ≥ 12) |")
    out.append("| --- | --- | --- | --- |")
    for fe in ["lsmd-nbd", "lsmd-fuse"]:
        q1, q32 = "remote randread 4k 1", "remote randread 4k 32"
        if runs.get((fe, q1)) and runs.get((fe, q32)):
            out.append(f"| {fe[5:].upper()} | {cell(fe, q1)} | {cell(fe, q32)} | "
                       f"**{med(fe, q32) / med(fe, q1):.1f}** |")
print("\n".join(out))
