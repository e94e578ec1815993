#!/usr/bin/env python3
"""Where an lsm start's time goes: one CSV row of phase times (seconds after the run's clock
started) from the marks run.sh wrote and lsmd's log.

Usage: phases.py T0 MARKS_FILE LSMD_LOG   (prints: lsmd_up,mounted,trace_ready,prefetch_done,
prefetch_fetches,cmd_done,teardown)

  lsmd_up       — lsmd serves the FUSE file (image opened: layer metadata fetched)
  mounted       — losetup + mount done (the command starts now)
  trace_ready   — lsmd logged it replays a trace (shipped: fetched and digest-checked)
  prefetch_done — lsmd's prefetch of the trace finished
  cmd_done      — the command exited (the run's time)
  teardown      — umount + losetup -d + lsmd stop took this long (not in the run's time)
"""
import datetime
import re
import sys

t0, marks, log = float(sys.argv[1]), sys.argv[2], sys.argv[3]
m = {}
for line in open(marks):
    k, v = line.split()
    m[k] = float(v)
ansi = re.compile(r"\x1b\[[0-9;]*m")


def when(line):
    stamp = line.split()[0]
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


trace_ready = prefetch_done = fetches = None
for line in open(log, errors="replace"):
    line = ansi.sub("", line)
    if trace_ready is None and "replaying the startup trace" in line:
        trace_ready = when(line)
    if prefetch_done is None and "prefetch done" in line:
        prefetch_done = when(line)
        f = re.search(r"fetches=(\d+)", line)
        fetches = f.group(1) if f else ""


def rel(x):
    return f"{x - t0:.3f}" if x is not None else ""


teardown = f"{m['stopped'] - m['cmd_done']:.3f}" if "stopped" in m and "cmd_done" in m else ""
print(",".join([rel(m.get("lsmd_up")), rel(m.get("mounted")), rel(trace_ready), rel(prefetch_done),
                fetches or "", rel(m.get("cmd_done")), teardown]))
