"""Celery + Redis no-op throughput: a baseline for the appliance's broker benchmark.

Measures how many no-op tasks per second stock Celery (prefork pool) with a
Redis broker and Redis result backend moves end to end on this machine: the
clock runs from the first ``noop.delay()`` to the last ``.get()`` returning.
The number is the "what most people would reach for" row next to the
appliance's own broker in the benchmark table; it measures queueing overhead
only, since the task does nothing.

Everything runs on loopback: the module starts a private ``redis-server``
(persistence off, working dir in a temp directory) on a free port and a
Celery worker subprocess that imports this same file, then stops both.

    python loadtest/celery_baseline.py --n 2000 --concurrency 2
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

REDIS_SERVER = "/usr/bin/redis-server"
URL_ENV = "CELERY_BASELINE_REDIS_URL"
TASK_NAME = "celery_baseline.noop"
HERE = Path(__file__).resolve().parent


def noop():
    return None


def make_app(url: str) -> Celery:
    """A Celery app using ``url`` as broker and result backend, with ``noop`` registered."""
    app = Celery("celery_baseline", broker=url, backend=url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    app.task(noop, name=TASK_NAME)
    return app


# The worker subprocess loads this (``-A celery_baseline:app``); the URL comes from its env.
app = make_app(os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so its whole group can be killed), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen | None, grace_s: float = 10) -> None:
    """SIGTERM the process, SIGKILL its whole process group if it lingers (or left children)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: pgid == pid
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{log.read_text()[-2000:]}")


def run_celery_noop(n_tasks: int = 5000, concurrency: int = 2, timeout_s: float = 300) -> dict:
    if not os.path.exists(REDIS_SERVER):
        raise RuntimeError(f"{REDIS_SERVER} not found; run `apt-get install -y redis-server`")
    tmp = Path(tempfile.mkdtemp(prefix="celery-baseline-"))
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = worker = client = None
    results = []
    try:
        redis_log = tmp / "redis.log"
        redis_proc = _spawn(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp),
             "--save", "", "--appendonly", "no", "--daemonize", "no"], redis_log, cwd=tmp)
        _wait_until(lambda: redis.Redis(port=port, socket_timeout=1).ping(),
                    30, "redis-server", redis_proc, redis_log)

        env = dict(os.environ, **{URL_ENV: url})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        worker_log = tmp / "worker.log"
        worker = _spawn(
            [sys.executable, "-m", "celery", "-A", "celery_baseline:app", "worker",
             "--pool", "prefork", "--concurrency", str(concurrency), "--loglevel", "warning",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            worker_log, cwd=HERE, env=env)

        client = make_app(url)
        task = client.tasks[TASK_NAME]
        _wait_until(lambda: client.control.ping(timeout=0.5),
                    min(60, timeout_s), "celery worker", worker, worker_log)
        task.delay().get(timeout=30)  # warm-up: one full round trip before the clock starts

        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        results.extend(task.delay() for _ in range(n_tasks))
        for r in results:
            r.get(timeout=max(0.1, deadline - time.monotonic()))
        elapsed = time.perf_counter() - t0
    finally:
        for r in results:  # after an error, skip AsyncResult.__del__'s unsubscribe from a dead redis
            r.backend = None
        if client is not None:
            client.close()
        _stop(worker)
        _stop(redis_proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"tasks": n_tasks, "seconds": round(elapsed, 3),
            "tasks_per_s": round(n_tasks / elapsed, 1), "concurrency": concurrency}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="number of no-op tasks")
    ap.add_argument("--concurrency", type=int, default=2, help="prefork worker processes")
    args = ap.parse_args()
    print(run_celery_noop(args.n, args.concurrency))
