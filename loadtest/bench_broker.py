"""Broker benchmarks; prints one table per part. Numbers go in README's performance section.

    .venv/bin/python loadtest/bench_broker.py            # all four parts
    .venv/bin/python loadtest/bench_broker.py --parts 1,2 --n 20000

1. The native scheduling core against the pure-Python reference: ops/s of
   push/pop/cancel mixes with 10k and 100k tasks queued.
2. No-op tasks through the real broker process over ZeroMQ (journal on, group
   commit) with a stub worker process: tasks/s end to end, dispatch latency, and the
   broker's RSS with 100k tasks queued.
3. The same no-op workload through Celery with a Redis broker, in the same run
   (needs `pip install -e '.[bench]'` and Debian's redis-server: `make bench` does both).
4. Scheduling quality: one worker with a fixed service time, `low` tasks offered at
   10x its capacity plus a trickle of `critical` and `high`: the trickle's queue wait.
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


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


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
        self.stats()  # waits until the broker answers

    def call(self, msg, timeout=30.0):
        self.client.send(P.encode(msg))
        if not self.client.poll(int(timeout * 1000)):
            raise TimeoutError("broker did not answer")
        return P.front_reply.decode(self.client.recv())

    def stats(self) -> P.Stats:
        deadline = time.monotonic() + 30
        while True:
            try:
                return self.call(P.GetStats(0), timeout=1.0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

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
    sock.send(P.encode(P.Ready("stub", "noop", slots, "none")))
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
    while not stop:
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
                    sock.send(P.encode(P.Ready("stub", "noop", slots, "none")))
                    sock.send(P.encode(P.Credit(slots)))
        if time.monotonic() - last_beat > P.HEARTBEAT_INTERVAL_S:
            sock.send(P.encode(P.Heartbeat()))
            last_beat = time.monotonic()
    Path(log).write_text(json.dumps(received))


# ------------------------------------------------------------------ part 2: throughput
def pump(broker: BrokerProcess, n: int, window: int) -> tuple[float, int]:
    """Submit n no-op tasks keeping `window` in flight; seconds until all completed."""
    spec = P.TaskSpec(type="complete", prompt="", max_tokens=1)
    sock = broker.client
    sent = acked = 0
    t0 = time.perf_counter()
    while acked < n:
        while sent < n and sent - acked < window:
            sock.send(P.encode(P.Submit(sent, spec)))
            sent += 1
        if sock.poll(1000):
            while True:
                try:
                    reply = P.front_reply.decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if not isinstance(reply, P.Accepted):
                    raise RuntimeError(f"submit refused: {reply}")
                acked += 1
    while broker.stats().finished.get("completed", 0) < n:
        time.sleep(0.002)
    return time.perf_counter() - t0, acked


def bench_broker(n: int) -> float:
    broker = BrokerProcess(QUEUE_MAX_SIZE=200_000)
    worker = start_worker(broker.back, 256, 0, broker.home / "w.json")
    rows = []
    try:
        while not broker.stats().workers:
            time.sleep(0.05)
        secs, _ = pump(broker, n, 1000)
        st = broker.stats()
        rate = n / secs
        rows.append(["no-op tasks, 1000 submits in flight", f"{n}", f"{rate:,.0f}", f"{st.dispatch_p50_ms:.2f}",
                     f"{st.dispatch_p99_ms:.2f}"])
        m = min(2000, n)
        secs1, _ = pump(broker, m, 1)
        st = broker.stats()
        rows.append(["no-op tasks, one at a time", f"{m}", f"{m / secs1:,.0f}", f"{st.dispatch_p50_ms:.2f}",
                     f"{st.dispatch_p99_ms:.2f}"])
    finally:
        stop_worker(worker)
        broker.stop()
    table("2a. broker over ZeroMQ (journal on, synchronous=FULL, group commit), stub worker with 256 slots",
          ["workload", "tasks", "tasks/s", "queued->dispatched p50 ms", "p99 ms"], rows)
    print("(with 1000 submits in flight the queue grows while the run lasts: its dispatch time is queue wait;\n"
          " one at a time shows the broker's own dispatch latency)")

    broker = BrokerProcess(QUEUE_MAX_SIZE=100_000)
    try:
        idle = broker.rss_mb()
        spec = P.TaskSpec(type="chat", messages=[P.ChatMessage("user", "Summarise the discharge note.")],
                          max_tokens=128)
        for i in range(100):
            reply = broker.call(P.SubmitBatch(i, [spec] * 1000))
            assert isinstance(reply, P.BatchAccepted), reply
        st = broker.stats()
        rss = broker.rss_mb()
        journal = sum(f.stat().st_size for f in (broker.home / "var" / "data").glob("journal*"))
    finally:
        broker.stop()
    table("2b. broker memory", ["state", "queued", "RSS MB", "journal MB"],
          [["idle", "0", f"{idle:.1f}", "-"], ["100k chat tasks queued", f"{st.queued:,}", f"{rss:.1f}",
                                               f"{journal / 2**20:.1f}"]])
    return rate


# ------------------------------------------------------------------ part 3: celery
def bench_celery(n: int, broker_rate: float | None) -> None:
    try:
        from celery_baseline import run_celery_noop
    except ImportError as exc:
        print(f"\n3. Celery baseline skipped: {exc} (run `make bench`)")
        return
    res = run_celery_noop(n_tasks=n, concurrency=2)
    rows = [["celery 5 + redis, prefork x2", f"{n}", f"{res['tasks_per_s']:,.0f}", "1.0x"]]
    if broker_rate:
        rows.append(["appliance broker (part 2a)", "", f"{broker_rate:,.0f}",
                     f"{broker_rate / res['tasks_per_s']:.1f}x"])
    table("3. the same no-op workload through Celery with Redis, same run",
          ["system", "tasks", "tasks/s", "vs celery"], rows)


# ------------------------------------------------------------------ part 4: scheduling quality
def bench_scheduling(seconds: float, service_ms: float) -> None:
    capacity = 1000 / service_ms
    broker = BrokerProcess(QUEUE_MAX_SIZE=200_000)
    log = broker.home / "worker.json"
    worker = start_worker(broker.back, 1, service_ms, log)
    sock = broker.client
    sent_at: dict[int, tuple[str, float]] = {}
    task_prio: dict[str, str] = {}
    try:
        while not broker.stats().workers:
            time.sleep(0.05)
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
            sock.send(P.encode(P.Submit(req, P.TaskSpec(type="complete", prompt="", priority=prio))))
            sent_at[req] = (prio, time.time())
            req += 1
            while sock.poll(0):
                reply = P.front_reply.decode(sock.recv())
                task_prio[reply.task_id] = sent_at[reply.req]
        deadline = time.time() + 10
        while len(task_prio) < req and time.time() < deadline:
            if sock.poll(100):
                reply = P.front_reply.decode(sock.recv())
                task_prio[reply.task_id] = sent_at[reply.req]
        time.sleep(2 * service_ms / 1000)
        st = broker.stats()
    finally:
        stop_worker(worker)
        broker.stop()
    waits: dict[str, list[float]] = {"critical": [], "high": [], "low": []}
    for task_id, received in json.loads(log.read_text()):
        prio, sent = task_prio[task_id]
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
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--n", type=int, default=50_000, help="no-op tasks in part 2")
    ap.add_argument("--celery-n", type=int, default=5_000, help="no-op tasks in part 3")
    ap.add_argument("--queue-ops", type=int, default=200_000, help="operations per mix in part 1")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    sys.path.insert(0, str(Path(__file__).parent))
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}")
    rate = None
    if 1 in parts:
        bench_queue(args.queue_ops)
    if 2 in parts:
        rate = bench_broker(args.n)
    if 3 in parts:
        bench_celery(args.celery_n, rate)
    if 4 in parts:
        bench_scheduling(10.0, 20.0)


if __name__ == "__main__":
    main()
