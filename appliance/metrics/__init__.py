"""Prometheus metrics of every process, in prometheus-client's multiprocess mode.

Why multiprocess mode: the API runs several gunicorn workers (the kernel picks which
one answers a scrape), and the broker, gpumon and each launcher are processes of
their own; one /metrics on the API's port shows them all. Each process writes its
figures to small mmap files in one directory, PROMETHEUS_MULTIPROC_DIR = RUN_DIR/metrics,
and the API's /metrics merges them on every scrape (appliance/api/metrics_api.py).

The rules that come with it (prometheus-client's): the variable must be set before
prometheus_client is first imported, so each procs/ entry module calls `use_dir`
first; gauges declare a `live*` mode, whose files go when their process is marked
dead; counters and histograms of dead processes stay (their counts are part of the
totals). Marking dead: gunicorn's child_exit hook for its workers (procs/api.py), a
sweep at every process's start and at every scrape for the rest (a restarted broker
must not leave its old gauges). `appliance up` empties the directory.

Nothing here imports prometheus_client at module level: importing this module must
not fix the mode before the directory is set.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def directory(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics"


def use_dir(run_dir: str | Path) -> Path:
    """Put this process (and its children) in multiprocess mode over RUN_DIR/metrics;
    marks dead the processes whose files are left there. Call before anything imports
    prometheus_client: afterwards the mode is fixed, and this refuses."""
    path = directory(run_dir)
    if "prometheus_client" in sys.modules and os.environ.get(ENV) != str(path):
        raise RuntimeError(f"prometheus_client was imported before {ENV} was set: metrics would stay in "
                           "this process; call appliance.metrics.use_dir first")
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    sweep(path)
    return path


def empty(run_dir: str | Path) -> None:
    """Forget the last run's figures (`appliance up`): counters start from zero."""
    path = directory(run_dir)
    for f in path.glob("*.db"):
        f.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep(path: str | Path | None = None) -> list[int]:
    """Mark dead every process that left files in the directory and no longer exists
    (their live gauges go; counters and histograms stay). The pids marked."""
    path = path or os.environ.get(ENV)
    if not path or not Path(path).is_dir():
        return []
    path = Path(path)
    from prometheus_client import multiprocess

    pids = set()
    for f in path.glob("*.db"):  # counter_123.db, gauge_livesum_123.db, histogram_123.db
        tail = f.stem.rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    dead = sorted(pid for pid in pids if pid != os.getpid() and not _alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return dead


def mark_dead(pid: int) -> None:
    """A child that exited (gunicorn's child_exit hook): its live gauges go now."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
