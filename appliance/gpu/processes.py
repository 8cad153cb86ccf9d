"""Which appliance instance a GPU process belongs to.

NVML lists processes by PID. The memory is held either by the launcher itself
(llama.cpp in-process, xllamacpp) or by its child (a CUDA `llama-server` it starts),
so a PID is mapped by walking up its parents to a launcher. A launcher is known by its
command line, `python -m procs.llama NAME` (what supervisord runs, appliance/ops/
supervisor.py): read from /proc only for the few PIDs NVML names and their parents,
with no PID files to go stale and no change to the launcher. A {pid: name} dict can be
given instead (tests, or a caller that already knows its launchers).

NVML reports PIDs of the host's PID namespace: in a container without the host's
PIDs, nothing maps and `instance` stays "".
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

LAUNCHER_MODULE = "procs.llama"
MAX_DEPTH = 16  # parents walked at most: a launcher's child is one or two levels down


def launcher_name(argv: list[str]) -> str | None:
    """The instance a `python -m procs.llama NAME` command line runs (procs/llama.py's
    own reading of its arguments), else None."""
    for i, arg in enumerate(argv):
        if arg == LAUNCHER_MODULE and i > 0 and argv[i - 1] == "-m":
            name = argv[i + 1] if i + 1 < len(argv) else "llama-0"
            return f"llama-{name}" if name.isdigit() else name
    return None


def _cmdline(pid: int, proc: Path) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []


def _parent(pid: int, proc: Path) -> int:
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)", which may hold spaces
    except (OSError, ValueError, IndexError):
        return 0


def _lineage(pid: int, proc: Path) -> Iterator[int]:
    for _ in range(MAX_DEPTH):
        if pid <= 1:
            return
        yield pid
        pid = _parent(pid, proc)


def instance_of(pid: int, launchers: Mapping[int, str] | None = None, proc: str | Path = "/proc") -> str:
    """The instance whose launcher is `pid` or one of its parents; "" for another process."""
    proc = Path(proc)
    for p in _lineage(pid, proc):
        if launchers is not None:
            if p in launchers:
                return launchers[p]
        elif (name := launcher_name(_cmdline(p, proc))) is not None:
            return name
    return ""
