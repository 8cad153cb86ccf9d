"""The soak's processes: supervisord's programs (`supervisorctl status`) and their
descendants (/proc: gunicorn workers, an external llama-server), named stably from one
snapshot to the next and measured for RSS, open descriptors and threads. Read from
/proc rather than with psutil so that the appliance gains no dependency.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Proc:
    name: str
    pid: int
    start: int  # /proc/PID/stat starttime: a reused pid is a different process
    rss_kib: int | None = None
    fds: int | None = None
    threads: int | None = None


@dataclass
class Snapshot:
    at: float
    procs: dict[str, Proc] = field(default_factory=dict)
    not_running: dict[str, str] = field(default_factory=dict)  # program -> supervisord state


def _ctl_bin() -> str:
    here = Path(sys.executable).parent / "supervisorctl"
    return str(here) if here.exists() else (shutil.which("supervisorctl") or "supervisorctl")


def supervised(home: Path) -> tuple[int, dict[str, tuple[str, int | None]]]:
    """supervisord's pid, and each program's (state, pid) from `supervisorctl status`."""
    conf = str(home / "supervisord.conf")
    ctl = _ctl_bin()
    pid = subprocess.run([ctl, "-c", conf, "pid"], capture_output=True, text=True, timeout=30).stdout.strip()
    if not pid.isdigit():
        raise RuntimeError(f"supervisorctl -c {conf} pid: {pid or 'no answer'} (is the appliance running?)")
    out = subprocess.run([ctl, "-c", conf, "status"], capture_output=True, text=True, timeout=30).stdout
    programs = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2:
            m = re.search(r"\bpid (\d+)", line)
            programs[words[0]] = (words[1], int(m.group(1)) if m else None)
    for name, (state, p) in programs.items():
        if p is None and state in ("STARTING", "STOPPING"):  # alive, but `status` shows no pid then
            got = subprocess.run([ctl, "-c", conf, "pid", name], capture_output=True, text=True, timeout=30)
            if got.stdout.strip().isdigit() and int(got.stdout) > 0:
                programs[name] = (state, int(got.stdout))
    return int(pid), programs


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) from /proc/PID/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(rest[1]), int(rest[19])


def _measure(p: Proc) -> None:
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    p.rss_kib = int(line.split()[1])
                elif line.startswith("Threads:"):
                    p.threads = int(line.split()[1])
        p.fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    except (OSError, ValueError):
        pass  # gone, or another user's: left None and reported


def program_label(program: str) -> str:
    """supervisord's name to the report's: `llama:llama-0` -> `llama-0`, `api` -> `api master`."""
    name = program.split(":", 1)[-1]
    return "api master" if name == "api" else name


def child_label(parent: str, i: int, n: int) -> str:
    if parent == "api master":
        return f"api worker {i}"
    if parent.startswith("llama") and n == 1:
        return f"{parent} server"
    return f"{parent} child {i}"


def snapshot(home: Path, previous: Snapshot | None = None) -> Snapshot:
    """Every supervised process and its descendants, named and measured.

    Children are numbered in start order; with `previous`, a child still alive keeps
    its name and a replacement takes the name of the one it replaced, so a restarted
    gunicorn worker shows as `api worker 2` with a new pid."""
    sup_pid, programs = supervised(home)
    children: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            children[st[0]].append((st[1], int(entry)))
    snap = Snapshot(at=time.time())
    own = _stat(sup_pid)
    if own:
        snap.procs["supervisord"] = Proc("supervisord", sup_pid, own[1])
    prev = previous.procs if previous else {}

    def add_children(label: str, pid: int) -> None:
        kids = sorted(children.get(pid, []))
        names = [child_label(label, i + 1, len(kids)) for i in range(len(kids))]
        taken: dict[int, str] = {}
        for start, kid in kids:  # survivors keep their names
            for name in names:
                if name in prev and (prev[name].pid, prev[name].start) == (kid, start):
                    taken[kid] = name
        free = [n for n in names if n not in taken.values()]
        for start, kid in kids:
            name = taken.get(kid) or free.pop(0)
            snap.procs[name] = Proc(name, kid, start)
            add_children(name, kid)

    for program, (state, pid) in sorted(programs.items()):
        label = program_label(program)
        st = _stat(pid) if pid else None
        if state not in ("RUNNING", "STARTING") or st is None:  # STARTING: alive, within its startsecs
            snap.not_running[label] = state
            continue
        snap.procs[label] = Proc(label, pid, st[1])
        add_children(label, pid)
    for p in snap.procs.values():
        _measure(p)
    return snap


def proc_order(name: str):
    """Sort key: supervisord and the appliance's own programs first, then the rest in
    natural order, so that `api worker 10` follows `api worker 9`."""
    fixed = ["supervisord", "broker", "gpumon", "api master"]
    return (fixed.index(name) if name in fixed else len(fixed), _natural(name))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
