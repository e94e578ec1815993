#!/usr/bin/env python3
"""Medians of benches/startup/run.sh's runs: a table (printed, and startup.md), startup.csv, and
a bar chart startup.png (gnuplot).

Usage: summarize.py RUNS_CSV OUT_DIR
"""
import csv
import os
import statistics
import subprocess
import sys

runs_csv, out = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(runs_csv)))
profiles = list(dict.fromkeys(r["profile"] for r in rows))
images = list(dict.fromkeys(r["image"] for r in rows))
MODES = [m for m in ["oci", "bare", "lazy", "trace", "shipped-nostartup", "shipped"] if any(r["mode"] == m for r in rows)]
LSM_MODES = [m for m in MODES if m != "oci"]
ROW_NAMES = {"bare": "lsm lazy, no prefetch", "lazy": "lsm lazy", "trace": "lsm + node trace", "shipped": "lsm + shipped trace", "shipped-nostartup": "lsm + shipped trace, no startup layer"}
CTR_MODES = [m for m in ("ctr-oci", "ctr-lazy", "ctr-shipped") if any(r["mode"] == m for r in rows)]


def med(profile, image, mode, field):
    v = [float(r[field]) for r in rows
         if (r["profile"], r["image"], r["mode"]) == (profile, image, mode) and r.get(field)]
    return statistics.median(v) if v else None


summary = []
for p in profiles:
    for i in images:
        one = next(r for r in rows if r["profile"] == p and r["image"] == i)
        s = {"profile": p, "image": i, "oci_image_bytes": int(one["oci_image_bytes"]),
             "lsm_image_bytes": int(one["lsm_image_bytes"]),
             "runs": sum(1 for r in rows if (r["profile"], r["image"], r["mode"]) == (p, i, "oci"))}
        for m in MODES + CTR_MODES:
            s[f"{m}_s"] = med(p, i, m, "seconds")
            s[f"{m}_bytes"] = med(p, i, m, "bytes_fetched")
            s[f"{m}_load"] = med(p, i, m, "load1")
        for m in LSM_MODES:
            s[f"{m}_gets"] = med(p, i, m, "lsm_gets")
            s[f"{m}_lsm_bytes"] = med(p, i, m, "lsm_bytes")
        for m in LSM_MODES:
            s[f"{m}_time_ratio"] = s[f"{m}_s"] / s["oci_s"] if s[f"{m}_s"] and s.get("oci_s") else None
            s[f"{m}_bytes_of_oci_image"] = s[f"{m}_bytes"] / s["oci_image_bytes"] if s[f"{m}_bytes"] is not None else None
            s[f"{m}_bytes_of_lsm_image"] = s[f"{m}_bytes"] / s["lsm_image_bytes"] if s[f"{m}_bytes"] is not None else None
        summary.append(s)

os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "startup.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
    w.writeheader()
    for s in summary:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in s.items()})


def mb(b):
    return f"{b / 1e6:.1f}" if b is not None else "–"


def pct(x):
    return f"{100 * x:.1f} %" if x is not None else "–"


def num(x, fmt="{:.0f}"):
    return fmt.format(x) if x is not None else "–"


# One row per (profile, image, way to start): OCI, then each lsm mode beside it.
lines = [
    "| profile | image | start | runs | s (median) | of OCI | MB on the wire (of OCI image) | lsmd GETs | lsmd MB | load |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for s in summary:
    s.setdefault("oci_s", None), s.setdefault("oci_bytes", None), s.setdefault("oci_load", None)
    lines.append(
        f"| {s['profile']} | {s['image']} | OCI pull+unpack+run | {s['runs']} | {num(s['oci_s'], '{:.2f}')} | 100 % "
        f"| {mb(s['oci_bytes'])} | – | – | {num(s['oci_load'], '{:.1f}')} |"
    )
    for m in LSM_MODES:
        lines.append(
            f"| {s['profile']} | {s['image']} | {ROW_NAMES[m]} | {s['runs']} | {num(s[f'{m}_s'], '{:.2f}')} "
            f"| **{pct(s[f'{m}_time_ratio'])}** | {mb(s[f'{m}_bytes'])} ({pct(s[f'{m}_bytes_of_oci_image'])}) "
            f"| {num(s[f'{m}_gets'])} | {mb(s[f'{m}_lsm_bytes']) if s[f'{m}_lsm_bytes'] is not None else '–'} "
            f"| {num(s[f'{m}_load'], '{:.1f}')} |"
        )
if "ctr-oci" in CTR_MODES and len(CTR_MODES) > 1:
    lsm_ctr = [m for m in CTR_MODES if m != "ctr-oci"]
    names = {"ctr-lazy": "lsm lazy", "ctr-shipped": "lsm + shipped trace"}
    lines += [
        "",
        "Through containerd 1.6 (`ctr image pull` + `ctr run`, overlayfs snapshotter, vs `lsmctl pull` + "
        "`ctr run --snapshotter lsm`; the shipped trace baked into the image's manifest):",
        "",
        "| profile | image | start | s (median) | of ctr pull + run | MB fetched (of OCI image) | load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        a = s["ctr-oci_s"]
        lines.append(
            f"| {s['profile']} | {s['image']} | ctr pull + run (overlayfs) | {num(a, '{:.2f}')} | 100 % "
            f"| {mb(s['ctr-oci_bytes'])} | {num(s['ctr-oci_load'], '{:.1f}')} |"
        )
        for m in lsm_ctr:
            b = s[f"{m}_s"]
            share = pct(b / a) if a and b else "–"
            frac = (f" ({100 * s[f'{m}_bytes'] / s['oci_image_bytes']:.1f} %)"
                    if s[f"{m}_bytes"] is not None else "")
            lines.append(
                f"| {s['profile']} | {s['image']} | lsmctl pull + ctr run, {names[m]} | {num(b, '{:.2f}')} "
                f"| **{share}** | {mb(s[f'{m}_bytes'])}{frac} | {num(s[f'{m}_load'], '{:.1f}')} |"
            )
# Where the lsm rows' time went (startup-phases.csv beside the runs, from phases.py): medians.
phases_csv = os.path.join(os.path.dirname(runs_csv), "startup-phases.csv")
if os.path.exists(phases_csv):
    ph = list(csv.DictReader(open(phases_csv)))
    cols = ["lsmd_up", "mounted", "trace_ready", "prefetch_done", "cmd_done", "teardown"]

    def pmed(p, i, m, c):
        v = [float(r[c]) for r in ph if (r["profile"], r["image"], r["mode"]) == (p, i, m) and r.get(c)]
        return f"{statistics.median(v):.2f}" if v else "–"
    lines += [
        "",
        "Where the lsm rows' time went (s after the clock started, medians; teardown = umount + "
        "losetup -d + lsmd stop, after the clock stopped):",
        "",
        "| profile | image | start | lsmd serves the file | mounted | trace ready | prefetch done | command done | teardown |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        for m in LSM_MODES:
            cells = " | ".join(pmed(s["profile"], s["image"], m, c) for c in cols)
            lines.append(f"| {s['profile']} | {s['image']} | {ROW_NAMES[m]} | {cells} |")
table = "\n".join(lines)
sizes = ", ".join(
    f"{s['image']}: OCI {mb(s['oci_image_bytes'])} MB, lsm {mb(s['lsm_image_bytes'])} MB"
    for s in summary if s["profile"] == profiles[0]
)
loads = [float(r["load1"]) for r in rows if r.get("load1")]
load_note = (f"Host load average (1 min) as the runs started: {min(loads):.1f}–{max(loads):.1f}, "
             f"median {statistics.median(loads):.1f} (the `load` column: median of that row's runs)."
             if loads else "Host load average: not recorded.")
with open(os.path.join(out, "startup.md"), "w") as f:
    f.write(table + "\n\nImage sizes (compressed layers): " + sizes + "\n\n" + load_note + "\n")
print(table)
print("\nImage sizes (compressed layers): " + sizes)
print(load_note)

# Chart: grouped bars of median seconds per (profile, image).
dat = os.path.join(out, "startup.dat")
with open(dat, "w") as f:
    for s in summary:
        f.write(f"{s['profile']}/{s['image']} " + " ".join(f"{s[f'{m}_s'] or 0:.3f}" for m in MODES) + "\n")
png = os.path.join(out, "startup.png")
gp = f"""
set terminal png size 1100,500
set output '{png}'
set title 'Time to a finished command in the image (median of runs; lower is better)'
set ylabel 'seconds'
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -25 offset -1,0
set xrange [-0.6:*]
set bmargin 6
set key top left
set grid ytics
plot '{dat}' using 2:xtic(1) title 'OCI pull + unpack + run'""" + "".join(
    f", '' using {k + 3} title '{ROW_NAMES[m]}'" for k, m in enumerate(LSM_MODES)) + "\n"
try:
    subprocess.run(["gnuplot"], input=gp.encode(), check=True)
    print(f"\nwrote {png}, {os.path.join(out, 'startup.csv')}, {os.path.join(out, 'startup.md')}")
except (OSError, subprocess.CalledProcessError) as e:
    print(f"\nno chart ({e}); wrote the CSV and the table")
