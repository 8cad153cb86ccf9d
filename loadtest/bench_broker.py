"""Broker benchmarks; prints one table per part. Numbers go in README's performance section.

    .venv/bin/python loadtest/bench_broker.py            # all four parts
    .venv/bin/python loadtest/bench_broker.py --parts 1,2 --n 20000
    .venv/bin/python loadtest/bench_broker.py --parts 2 --database-url postgresql://u:p@127.0.0.1/scratch

1. The native scheduling core against the pure-Python reference: ops/s of
   push/pop/cancel mixes with 10k and 100k tasks queued.
2. No-op tasks through the real broker process over ZeroMQ (journal on, group
   commit) with a stub worker process: tasks/s end to end, dispatch latency, and the
   broker's RSS with 100k tasks queued. The journal is SQLite in the broker's home, or
   PostgreSQL with --database-url (a scratch database: its journal tables are dropped
   before each broker start, so that every run starts empty).
3. The same no-op workload through Celery with a Redis broker, in the same run
   (needs `pip install -e '.[bench]'` and Debian's redis-server: `make bench` does both).
4. Scheduling quality: one worker with a fixed service time, `low` tasks offered at
   10x its capacity plus a trickle of `critical` and `high`: the trickle's queue wait.

No wait is unbounded: every wait for acknowledgements, completions or workers gives up
after --stall-s seconds without progress (default 30), or after a cap derived from the
work it waits for, whichever comes first; it then prints what never arrived and the
run exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import protocol as P  # noqa: E402

# The model the stub worker serves: the broker's default (its home has no instances
# file), so that tasks naming no model are dispatched to it.
MODEL = "appliance-tiny"


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class BenchTimeout(RuntimeError):
    """A bounded wait ran out; the message says what never arrived."""


STALL_S = 30.0      # give up after this long without progress (--stall-s)
DATABASE_URL = ""   # part 2's journal when set (--database-url); else SQLite in the broker's home
MIN_RATE = 100.0    # ... or after the work at this many per second (floor 60 s), whichever is first


class Watchdog:
    """The bound on one wait for `total` things (acks, completions): check(count) returns
    None while the wait may go on, else why it must stop ("after 30 s without progress")."""

    def __init__(self, total: int, floor_s: float = 60.0):
        self.total = total
        self.stall_s = STALL_S
        self.cap_s = max(floor_s, total / MIN_RATE, self.stall_s)
        self.start = self.last = time.monotonic()
        self.count = -1

    def check(self, count: int) -> str | None:
        now = time.monotonic()
        if count > self.count:
            self.count, self.last = count, now
        if now - self.last > self.stall_s:
            return f"after {now - self.last:.0f} s without progress"
        if now - self.start > self.cap_s:
            return f"after {now - self.start:.0f} s in all (the bound for {self.total} is {self.cap_s:.0f} s)"
        return None


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))


# ------------------------------------------------------------------ part 1: queue core
def bench_queue(ops: int) -> None:
    from appliance.broker._pqueue import PriorityQueue
    from appliance.broker.refqueue import RefPriorityQueue

    rows = []
    for queued in (10_000, 100_000):
        rnd = random.Random(7)
        levels = [rnd.randrange(5) for _ in range(queued + ops)]
        tenants = [rnd.choice("abcd") for _ in range(queued + ops)]
        result = {}
        for name, Q in (("native", PriorityQueue), ("reference", RefPriorityQueue)):
            n = ops if name == "native" else max(2000, ops // 20)  # the reference's cancel is O(n)
            per_mix = {}
            for mix in ("push+pop", "push+cancel", "push+pop+cancel"):
                q = Q(5, queued + n + 10, 30.0)
                for h in range(queued):
                    q.push(h, levels[h], 0.0, tenants[h])
                t0 = time.perf_counter()
                count = 0
                if mix == "push+pop":
                    for h in range(queued, queued + n):
                        q.push(h, levels[h], 1.0, tenants[h])
                        q.pop(1.0)
                    count = 2 * n
                elif mix == "push+cancel":  # cancel the oldest task still queued: always a hit
                    for h in range(queued, queued + n):
                        q.push(h, levels[h], 1.0, tenants[h])
                        q.cancel(h - queued)
                    count = 2 * n
                else:  # every other step cancels a random earlier task (gone or not)
                    victims = [rnd.randrange(h) for h in range(queued, queued + n)]
                    for i, h in enumerate(range(queued, queued + n)):
                        q.push(h, levels[h], 1.0, tenants[h])
                        q.pop(1.0)
                        if i % 2:
                            q.cancel(victims[i])
                            count += 1
                    count += 2 * n
                per_mix[mix] = count / (time.perf_counter() - t0)
            result[name] = per_mix
        for mix in ("push+pop", "push+cancel", "push+pop+cancel"):
            nat, ref = result["native"][mix], result["reference"][mix]
            rows.append([f"{mix} @ {queued // 1000}k queued", f"{nat:,.0f}", f"{ref:,.0f}", f"{nat / ref:.1f}x"])
    table("1. scheduling core, ops/s (5 levels, 4 tenants, aging on)",
          ["mix", "native", "python reference", "speed-up"], rows)


# ------------------------------------------------------------------ broker process helpers
class BrokerProcess:
    def __init__(self, **env):
        self.home = Path(tempfile.mkdtemp(prefix="bench-"))
        self.env = {**os.environ, "APPLIANCE_HOME": str(self.home), "LOG_LEVEL": "WARNING",
                    "QUEUE_AGING_S": "30", **{k: str(v) for k, v in env.items()}}
        for key in ("BROKER_FRONT", "BROKER_BACK", "TELEMETRY_ENDPOINT"):
            self.env.pop(key, None)
        run = self.home / "var" / "run"
        self.front = f"ipc://{run}/broker-front.ipc"
        self.back = f"ipc://{run}/broker-back.ipc"
        self.proc = subprocess.Popen([sys.executable, "-m", "procs.broker"], cwd=ROOT, env=self.env,
                                     start_new_session=True)
        self.client = zmq.Context.instance().socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.setsockopt(zmq.SNDHWM, 0)
        self.client.setsockopt(zmq.RCVHWM, 0)
        self.client.connect(self.front)
        self.req = 1 << 40  # request ids for call(), apart from the benchmarks' Submit ids (0, 1, ...)
        try:
            self.stats()  # waits until the broker answers
        except BaseException:
            self.stop()
            raise

    def alive(self) -> str:
        code = self.proc.poll()
        return "the broker process is running" if code is None else f"the broker process exited with {code}"

    def call(self, msg, timeout=30.0):
        """Send one request and return the reply with its `req`; stale replies (to an
        earlier call that timed out) are dropped."""
        self.req += 1
        msg.req = self.req
        self.client.send(P.encode(msg))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.client.poll(max(1, int(left * 1000))):
                reply = P.front_reply.decode(self.client.recv())
                if reply.req == msg.req:
                    return reply
        raise TimeoutError(f"broker did not answer {type(msg).__name__} within {timeout:g} s ({self.alive()})")

    def stats(self, timeout: float = 30.0) -> P.Stats:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchTimeout(f"GetStats: {self.alive()}")
            try:
                return self.call(P.GetStats(0), timeout=1.0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise BenchTimeout(f"the broker did not answer GetStats for {timeout:g} s "
                                       f"({self.alive()})") from None

    def report(self, completed_before: int = 0) -> str:
        """What the broker says it has, for a timeout's message (never raises)."""
        try:
            st = self.stats(timeout=5.0)
        except BenchTimeout as exc:
            return str(exc)
        done = st.finished.get("completed", 0) - completed_before
        other = {k: v for k, v in st.finished.items() if k != "completed" and v}
        return (f"broker reports {done} completed" + (f" ({other} otherwise finished)" if other else "")
                + f", {st.queued} queued, {st.running} running, {len(st.workers)} worker(s)")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.client.close(0)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_worker(back: str, slots: int, service_ms: float, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", back, str(slots), str(service_ms), str(log)],
                            cwd=ROOT, start_new_session=True)


def wait_for_worker(broker: BrokerProcess, worker: subprocess.Popen, phase: str, timeout: float = 30.0) -> None:
    """Until the stub worker has registered with the broker; BenchTimeout after `timeout` s."""
    timeout = max(timeout, STALL_S)
    deadline = time.monotonic() + timeout
    while not broker.stats().workers:
        if worker.poll() is not None:
            raise BenchTimeout(f"{phase}: the stub worker exited with {worker.returncode} before registering")
        if time.monotonic() > deadline:
            raise BenchTimeout(f"{phase}: no worker registered with the broker after {timeout:.0f} s "
                               f"(the stub worker is running; {broker.alive()})")
        time.sleep(0.05)


def stop_worker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def worker_main(back: str, slots: int, service_ms: float, log: str) -> None:
    """A stub launcher: answers every Dispatch with Done + Credit, after `service_ms`."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"stub")
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(back)
    sock.send(P.encode(P.Ready("stub", MODEL, slots, "none")))
    sock.send(P.encode(P.Credit(slots)))
    received: list[tuple[str, float]] = []
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    done = P.encode(P.Credit(1))
    result = P.TaskResult(text="")
    last_beat = time.monotonic()
    parent = os.getppid()
    while not stop and os.getppid() == parent:  # the benchmark gone (killed): stop too
        if sock.poll(100):
            while True:
                try:
                    msg = P.broker_to_worker.decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, P.Dispatch):
                    received.append((msg.task_id, time.time()))
                    if service_ms:
                        time.sleep(service_ms / 1000)
                    sock.send(P.encode(P.Done(msg.task_id, result=result)))
                    sock.send(done)
                elif isinstance(msg, P.Disconnect):
                    sock.send(P.encode(P.Ready("stub", MODEL, slots, "none")))
                    sock.send(P.encode(P.Credit(slots)))
        if time.monotonic() - last_beat > P.HEARTBEAT_INTERVAL_S:
            sock.send(P.encode(P.Heartbeat()))
            last_beat = time.monotonic()
    Path(log).write_text(json.dumps(received))


# ------------------------------------------------------------------ part 2: throughput
def pump(broker: BrokerProcess, n: int, window: int, phase: str) -> tuple[float, int]:
    """Submit n no-op tasks keeping `window` in flight; seconds until all completed.

    Bounded: raises BenchTimeout, naming what is missing, when acknowledgements or
    completions stop coming (Watchdog)."""
    spec = P.CompleteTask(prompt="", max_tokens=1)
    sock = broker.client
    before = broker.stats().finished.get("completed", 0)  # the broker's count runs across pumps
    got = bytearray(n)  # got[req]: its Accepted arrived
    sent = acked = 0
    dog = Watchdog(n)
    t0 = time.perf_counter()
    while acked < n:
        while sent < n and sent - acked < window:
            sock.send(P.encode(P.Submit(sent, spec)))
            sent += 1
        if sock.poll(100):
            while True:
                try:
                    reply = P.front_reply.decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(reply, P.Stats):  # a late answer to a GetStats that was retried
                    continue
                if not isinstance(reply, P.Accepted):
                    raise RuntimeError(f"{phase}: submit refused: {reply}")
                if 0 <= reply.req < n and not got[reply.req]:
                    got[reply.req] = 1
                    acked += 1
        if (why := dog.check(acked)) is not None:
            missing = [i for i in range(sent) if not got[i]]
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            unsent = f"; {n - sent} not sent (window {window})" if sent < n else ""
            raise BenchTimeout(f"{phase}: {n - acked} of {n} submits never acknowledged {why} "
                               f"(req {shown}){unsent}; {broker.report(before)}")
    dog = Watchdog(n)
    while (done := broker.stats().finished.get("completed", 0) - before) < n:
        if (why := dog.check(done)) is not None:
            raise BenchTimeout(f"{phase}: {n - done} of {n} acknowledged tasks never completed {why}; "
                               f"{broker.report(before)}")
        time.sleep(0.002)
    return time.perf_counter() - t0, acked


def journal_env() -> dict[str, str]:
    """DATABASE_URL for a broker of part 2: a PostgreSQL scratch database emptied first."""
    if not DATABASE_URL:
        return {}
    import psycopg

    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS tasks, schema_version")
    return {"DATABASE_URL": DATABASE_URL}


def journal_bytes(broker: BrokerProcess) -> int:
    """The journal's size on disk: SQLite's files, or the PostgreSQL table with its indexes."""
    if not DATABASE_URL:
        return sum(f.stat().st_size for f in (broker.home / "var" / "data").glob("journal*"))
    import psycopg

    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        return conn.execute("SELECT pg_total_relation_size('tasks')").fetchone()[0]


def bench_broker(n: int) -> float:
    journal_name = "PostgreSQL" if DATABASE_URL else "SQLite synchronous=FULL"
    broker = BrokerProcess(QUEUE_MAX_SIZE=200_000, **journal_env())
    worker = start_worker(broker.back, 256, 0, broker.home / "w.json")
    rows = []
    try:
        wait_for_worker(broker, worker, "phase 2a")
        secs, _ = pump(broker, n, 1000, "phase 2a (1000 in flight)")
        st = broker.stats()
        rate = n / secs
        rows.append(["no-op tasks, 1000 submits in flight", f"{n}", f"{rate:,.0f}", f"{st.dispatch_p50_ms:.2f}",
                     f"{st.dispatch_p99_ms:.2f}"])
        m = min(2000, n)
        secs1, _ = pump(broker, m, 1, "phase 2a (one at a time)")
        st = broker.stats()
        rows.append(["no-op tasks, one at a time", f"{m}", f"{m / secs1:,.0f}", f"{st.dispatch_p50_ms:.2f}",
                     f"{st.dispatch_p99_ms:.2f}"])
    finally:
        stop_worker(worker)
        broker.stop()
    table(f"2a. broker over ZeroMQ (journal on: {journal_name}, group commit), stub worker with 256 slots",
          ["workload", "tasks", "tasks/s", "queued->dispatched p50 ms", "p99 ms"], rows)
    print("(with 1000 submits in flight the queue grows while the run lasts: its dispatch time is queue wait;\n"
          " one at a time shows the broker's own dispatch latency)")

    broker = BrokerProcess(QUEUE_MAX_SIZE=100_000, **journal_env())
    try:
        idle = broker.rss_mb()
        spec = P.ChatTask(messages=[P.ChatMessage("user", "Summarise the discharge note.")],
                          max_tokens=128)
        for i in range(100):
            try:
                reply = broker.call(P.SubmitBatch(i, [spec] * 1000), timeout=max(30.0, STALL_S))
            except TimeoutError as exc:
                raise BenchTimeout(f"phase 2b: batch {i + 1} of 100 (1000 tasks) never acknowledged: {exc}; "
                                   f"{broker.report()}") from None
            assert isinstance(reply, P.BatchAccepted), reply
        st = broker.stats()
        rss = broker.rss_mb()
        journal = journal_bytes(broker)
    finally:
        broker.stop()
    table("2b. broker memory", ["state", "queued", "RSS MB", "journal MB"],
          [["idle", "0", f"{idle:.1f}", "-"], ["100k chat tasks queued", f"{st.queued:,}", f"{rss:.1f}",
                                               f"{journal / 2**20:.1f}"]])
    return rate


# ------------------------------------------------------------------ part 3: celery
def bench_celery(n: int, broker_rate: float | None) -> None:
    try:
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery_baseline import run_celery_noop
    except ImportError as exc:
        print(f"\n3. Celery baseline skipped: {exc} (run `make bench`)")
        return
    limit = max(300.0, n / MIN_RATE)
    try:
        res = run_celery_noop(n_tasks=n, concurrency=2, timeout_s=limit)
    except CeleryTimeout as exc:
        raise BenchTimeout(f"phase 3: Celery did not complete all {n} no-op tasks within {limit:.0f} s "
                           f"({exc})") from None
    rows = [["celery 5 + redis, prefork x2", f"{n}", f"{res['tasks_per_s']:,.0f}", "1.0x"]]
    if broker_rate:
        rows.append(["appliance broker (part 2a)", "", f"{broker_rate:,.0f}",
                     f"{broker_rate / res['tasks_per_s']:.1f}x"])
    table("3. the same no-op workload through Celery with Redis, same run",
          ["system", "tasks", "tasks/s", "vs celery"], rows)


# ------------------------------------------------------------------ part 4: scheduling quality
def bench_scheduling(seconds: float, service_ms: float) -> None:
    label = "phase 4"  # (`phase` is the trickles' offset below)
    capacity = 1000 / service_ms
    broker = BrokerProcess(QUEUE_MAX_SIZE=200_000)
    log = broker.home / "worker.json"
    worker = start_worker(broker.back, 1, service_ms, log)
    sock = broker.client
    sent_at: dict[int, tuple[str, float]] = {}
    task_prio: dict[str, tuple[int, tuple[str, float]]] = {}  # task id -> (req, (priority, sent at))

    def take(reply) -> None:
        if isinstance(reply, P.Stats):  # a late answer to a GetStats that was retried
            return
        if not isinstance(reply, P.Accepted):
            raise RuntimeError(f"{label}: submit refused: {reply}")
        task_prio[reply.task_id] = (reply.req, sent_at[reply.req])
    try:
        wait_for_worker(broker, worker, label)
        plan = []  # (offset, priority)
        low_rate, trickle = 10 * capacity, 5.0
        t = 0.0
        while t < seconds:
            plan.append((t, "low"))
            t += 1 / low_rate
        for prio, phase in (("critical", 0.0), ("high", 0.1)):
            t = phase + 0.5
            while t < seconds:
                plan.append((t, prio))
                t += 1 / trickle
        plan.sort()
        start = time.time()
        req = 0
        for offset, prio in plan:
            delay = start + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            sock.send(P.encode(P.Submit(req, P.CompleteTask(prompt="", priority=prio))))
            sent_at[req] = (prio, time.time())
            req += 1
            while sock.poll(0):
                take(P.front_reply.decode(sock.recv()))
        dog = Watchdog(req, floor_s=30.0)
        while len(task_prio) < req:
            if sock.poll(100):
                take(P.front_reply.decode(sock.recv()))
            if (why := dog.check(len(task_prio))) is not None:
                acked = {r for r, _ in task_prio.values()}
                missing = [r for r in range(req) if r not in acked]
                shown = (", ".join(f"{r} ({sent_at[r][0]})" for r in missing[:10])
                         + (", ..." if len(missing) > 10 else ""))
                raise BenchTimeout(f"{label}: {req - len(task_prio)} of {req} submits never acknowledged {why} "
                                   f"(req {shown}); {broker.report()}")
        time.sleep(2 * service_ms / 1000)
        st = broker.stats()
    finally:
        stop_worker(worker)
        broker.stop()
    waits: dict[str, list[float]] = {"critical": [], "high": [], "low": []}
    for task_id, received in json.loads(log.read_text()):
        prio, sent = task_prio[task_id][1]
        waits[prio].append((received - sent) * 1000)
    rows = []
    for prio in ("critical", "high", "low"):
        w = waits[prio]
        offered = sum(1 for p, _ in sent_at.values() if p == prio)
        rows.append([prio, f"{offered}", f"{len(w)}", f"{statistics.median(w):.1f}" if w else "-",
                     f"{pct(w, 95):.1f}" if w else "-", f"{max(w):.1f}" if w else "-"])
    table(f"4. scheduling under 10x overload: 1 worker, {service_ms:g} ms service time, {seconds:g} s; "
          f"{st.queued} low still queued at the end",
          ["priority", "submitted", "dispatched", "wait p50 ms", "wait p95 ms", "max ms"], rows)


def main() -> None:
    global STALL_S, DATABASE_URL
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--n", type=int, default=50_000, help="no-op tasks in part 2")
    ap.add_argument("--celery-n", type=int, default=5_000, help="no-op tasks in part 3")
    ap.add_argument("--queue-ops", type=int, default=200_000, help="operations per mix in part 1")
    ap.add_argument("--sched-seconds", type=float, default=10.0, help="seconds of overload in part 4")
    ap.add_argument("--stall-s", type=float, default=STALL_S,
                    help="give up a wait (acks, completions, workers) after this many seconds without progress")
    ap.add_argument("--database-url", default="",
                    help="part 2's journal: a PostgreSQL scratch database (its journal tables are dropped)")
    args = ap.parse_args()
    STALL_S = args.stall_s
    DATABASE_URL = args.database_url
    parts = {int(p) for p in args.parts.split(",")}
    sys.path.insert(0, str(Path(__file__).parent))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = f"{os.cpu_count()} cores" + (f" ({usable} usable by this process)" if usable != os.cpu_count() else "")
    print(f"machine: {cores}, Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}")
    rate = None
    try:
        if 1 in parts:
            bench_queue(args.queue_ops)
        if 2 in parts:
            rate = bench_broker(args.n)
        if 3 in parts:
            bench_celery(args.celery_n, rate)
        if 4 in parts:
            bench_scheduling(args.sched_seconds, 20.0)
    except BenchTimeout as exc:
        sys.stdout.flush()
        print(f"\nbench_broker: FAILED: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
