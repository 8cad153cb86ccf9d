"""Several boxes on one shared queue (QUEUE_SCOPE=shared): what the shared queue costs and what it scales.

    .venv/bin/python loadtest/bench_boxes.py                       # all three parts, boxes 1,2,3
    .venv/bin/python loadtest/bench_boxes.py --parts 1 --boxes 1,2 --n 2000
    .venv/bin/python loadtest/bench_boxes.py --parts 2 --boxes 1,2 --n 16
    .venv/bin/python loadtest/bench_boxes.py --database-url postgresql://u:p@127.0.0.1/scratch

The queue lives in PostgreSQL: by default a throwaway cluster that the benchmark
initdb's, starts and removes itself (tests/support/postgres.py; Debian's postgresql
package), with a fresh database per configuration. With --database-url it uses that
scratch database instead and DROPS the appliance's tables there (tasks, schema_version,
boxes, tenant_turns, the sequence task_seq) before each configuration.

1. No-op tasks through broker processes over ZeroMQ (bench_broker's BrokerProcess and
   stub worker: 64 slots, answers at once). For each box count k in --boxes: k brokers
   (QUEUE_SCOPE=shared, BOX_NAME=box1.., the same fresh database), one stub worker
   each; n no-op tasks submitted round robin over the brokers with --window submits in
   flight in all. Baselines in the same run: one broker with QUEUE_SCOPE=box on a
   PostgreSQL journal, and one on SQLite (the default journal). Reported: tasks/s
   (first submit -> last completion the brokers count), latency submit -> completed
   (client send time -> the record's finished_at, read from the journal afterwards:
   with --window in flight it is mostly waiting behind the window, window/throughput),
   and how many tasks each box ran (the records' `box`).
2. Model-bound tasks on whole appliances (bench_api's Appliance: temp home, free
   port, its own secret and token): k appliances sharing one fresh database, each
   with one llama.cpp instance (LLAMA_INSTANCES=1, LLAMA_THREADS=1, LLAMA_SLOTS=2) of
   a generated random-weight GGUF (TinySpec n_embd 512, n_ff 2048, --n-layer layers;
   biased away from EOS, so a chat asking for --max-tokens gets that many: the table
   shows the tokens actually generated). Of the 2 slots the default reservation keeps
   1 for critical/high work, so these normal-priority chats run one at a time per box:
   what an operator's default box does. --n chat tasks go through the boxes' APIs,
   --inflight per box at all times (more than its slots: one box alone is saturated);
   each task is polled through the API that accepted it until final. Reported: tasks/s
   (first submit -> last finished_at), p50/p95 latency (submit -> the record's
   finished_at) and queue wait (submit -> started_at: how fairly the shared queue
   serves), tasks run per box (the status's `box`) and how many ran on another box
   than the one that accepted them, re-runs (attempts > 1), ERROR lines in the boxes'
   logs (kept in /tmp/bench-boxes-logs/k<K>-box<I>/), and the speed-up over k=1.

   The machine matters: every box here runs on the same cores. Each llama.cpp uses one
   thread, so on a 2-core machine two boxes can each have a core (minus the brokers',
   APIs' and this client's CPU), but a third box only shares them: the scaling from
   k=2 to k=3 cannot show on such a machine. The report prints os.cpu_count().
3. Capacity-bound tasks that do not use this machine's cores: part 1's brokers, each
   with one stub instance of 1 slot that takes --service-ms per task (a sleep: what a
   GPU-bound instance costs the CPU). --n tasks (default 600), 8 per box in flight:
   how the shared queue itself scales from 1 to k boxes when the work is the limit.

Every wait is bounded (part 1: --stall-s without progress; part 2: --model-stall-s
without a completed task, --bound-s for a configuration's tasks, 90 s for an appliance
to become ready, 120 s for its instance, 75 s for the boxes to see each other): a
configuration that hits a bound, or whose task fails, gets a FAILED row with what never
arrived (and what the boxes say), the other configurations still run, and the run exits
with status 1. Brokers, stub workers, appliances (supervisorctl shutdown, then anything
left in their sessions is killed by pid) and the throwaway PostgreSQL are stopped in
finally blocks, also on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_broker  # noqa: E402  (inserts ROOT in sys.path)
from bench_broker import (BenchTimeout, BrokerProcess, Watchdog, pct, start_worker, stop_worker,  # noqa: E402
                          table, wait_for_worker)

from appliance import protocol as P  # noqa: E402
from appliance.store.journal import _rec  # noqa: E402  (the journal's record decoder)

PG_TABLES = "tasks, schema_version, boxes, tenant_turns"
# Settings the benchmark decides for each box: a caller's value would change what part 2 measures.
CONTROLLED = ("QUEUE_SCOPE", "BOX_NAME", "LEASE_S", "INSTANCES_FILE", "LLAMA_INSTANCES", "LLAMA_THREADS",
              "LLAMA_SLOTS", "MODEL_PATH", "MODEL_ALIAS", "DEFAULT_MODEL", "QUEUE_MAX_SIZE", "RATE_LIMITS",
              "TASK_TIMEOUT_MAX_S")
LIFTED = {"QUEUE_MAX_SIZE": 200_000, "TASK_TIMEOUT_MAX_S": 3600,
          "RATE_LIMITS": "tasks:write=100000/s:100000,tasks:read=100000/s:100000"}
FINAL = ("completed", "failed", "cancelled", "expired")
LOG_KEEP = Path("/tmp/bench-boxes-logs")  # part 2: each box's logs, kept after its home is removed
T0 = time.monotonic()


def at() -> str:
    return f"[{time.monotonic() - T0:.0f} s]"


class BenchError(RuntimeError):
    """Something misbehaved (a refused submit, a failed task): the message says what."""


# ------------------------------------------------------------------ databases
class Databases:
    """A fresh, empty PostgreSQL database per configuration: a new database on the
    throwaway server, or the caller's scratch database with the appliance's tables dropped."""

    def __init__(self, url: str):
        self.url = url
        self.pg = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Databases:
        if not self.url:
            from tests.support.postgres import throwaway_postgres

            self.pg = self._stack.enter_context(throwaway_postgres())
            print(f"{at()} throwaway PostgreSQL on 127.0.0.1:{self.pg.port} (initdb + start "
                  f"{self.pg.startup_s:.1f} s)", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def fresh(self) -> str:
        if self.pg is not None:
            return self.pg.new_database()
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {PG_TABLES}")
            conn.execute("DROP SEQUENCE IF EXISTS task_seq")
        return self.url

    def where(self) -> str:
        if self.pg is not None:
            return "a throwaway PostgreSQL cluster (this machine), a new database per configuration"
        from appliance.config import Settings

        shown = Settings(database_url=self.url).journal_path  # never the password
        return f"{shown} (its tables dropped before each configuration)"


def pg_records(url: str) -> dict[str, P.TaskRecord]:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute("SELECT record FROM tasks").fetchall()
    return {r.task_id: r for r in (_rec.decode(bytes(row[0])) for row in rows)}


def sqlite_records(path: Path) -> dict[str, P.TaskRecord]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT record FROM tasks").fetchall()
    finally:
        db.close()
    return {r.task_id: r for r in (_rec.decode(row[0]) for row in rows)}


def per_box(boxes: list[str | None]) -> str:
    counts: dict[str, int] = {}
    for b in boxes:
        counts[b or "-"] = counts.get(b or "-", 0) + 1
    return " ".join(f"{b}:{c}" for b, c in sorted(counts.items()))


# ------------------------------------------------------------------ part 1: no-op tasks
def pump_many(brokers: list[BrokerProcess], n: int, window: int, phase: str) -> tuple[float, list[float], list[str]]:
    """Submit n no-op tasks round robin over the brokers, `window` unacknowledged in all;
    wait until the brokers together count n more completed. Returns (seconds, send
    time of each submit, task id of each). Bounded (bench_broker's Watchdog)."""
    spec = P.CompleteTask(prompt="", max_tokens=1)
    k = len(brokers)
    socks = [b.client for b in brokers]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    before = [b.stats().finished.get("completed", 0) for b in brokers]
    sent_at = [0.0] * n
    task_of: list[str] = [""] * n
    sent = acked = 0
    dog = Watchdog(n)
    t0 = time.perf_counter()
    while acked < n:
        while sent < n and sent - acked < window:
            socks[sent % k].send(P.encode(P.Submit(sent, spec)))
            sent_at[sent] = time.time()
            sent += 1
        for sock, _ in poller.poll(100):
            while True:
                try:
                    reply = P.front_reply.decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(reply, P.Stats):  # a late answer to a GetStats that was retried
                    continue
                if not isinstance(reply, P.Accepted):
                    raise BenchError(f"{phase}: submit refused: {reply}")
                if 0 <= reply.req < n and not task_of[reply.req]:
                    task_of[reply.req] = reply.task_id
                    acked += 1
        if (why := dog.check(acked)) is not None:
            missing = [i for i in range(sent) if not task_of[i]]
            shown = ", ".join(f"{i} (box{i % k + 1})" for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise BenchTimeout(f"{phase}: {n - acked} of {n} submits never acknowledged {why} (req {shown}); "
                               + "; ".join(f"box{i + 1}: {b.report(before[i])}" for i, b in enumerate(brokers)))
    dog = Watchdog(n)
    while True:
        done = sum(b.stats().finished.get("completed", 0) - before[i] for i, b in enumerate(brokers))
        if done >= n:
            break
        if (why := dog.check(done)) is not None:
            raise BenchTimeout(f"{phase}: {n - done} of {n} acknowledged tasks never completed {why}; "
                               + "; ".join(f"box{i + 1}: {b.report(before[i])}" for i, b in enumerate(brokers)))
        time.sleep(0.005)
    return time.perf_counter() - t0, sent_at, task_of


def noop_config(label: str, k: int, n: int, window: int, env: dict[str, str], shared: bool,
                records, slots: int = 64, service_ms: float = 0, part: int = 1) -> list[str]:
    """One configuration of part 1 (or 3): k brokers with a stub worker each; its table row."""
    brokers: list[BrokerProcess] = []
    workers: list[subprocess.Popen] = []
    print(f"{at()} part {part}: {label}, {n} tasks of {service_ms:g} ms, {window} submits in flight", flush=True)
    try:
        for i in range(k):
            box_env = {**env, "BOX_NAME": f"box{i + 1}", "QUEUE_SCOPE": "shared"} if shared else env
            brokers.append(BrokerProcess(QUEUE_MAX_SIZE=500_000, **box_env))
            workers.append(start_worker(brokers[-1].back, slots, service_ms, brokers[-1].home / "w.json"))
        for i, (b, w) in enumerate(zip(brokers, workers)):
            wait_for_worker(b, w, f"part {part}, {label}, box{i + 1}")
        if shared:  # every box has renewed its lease once (membership), so that all are in
            deadline = time.monotonic() + max(30.0, bench_broker.STALL_S)
            while len(seen := brokers[0].stats().boxes) < k:
                if time.monotonic() > deadline:
                    raise BenchTimeout(f"part {part}, {label}: box1 sees only {seen} of {k} boxes after "
                                       f"{max(30.0, bench_broker.STALL_S):.0f} s")
                time.sleep(0.2)
        secs, sent_at, task_of = pump_many(brokers, n, window, f"part {part}, {label}")
        ran = [b.stats().finished.get("completed", 0) for b in brokers]
        recs = records(brokers)
    finally:
        for w in workers:
            stop_worker(w)
        for b in brokers:
            b.stop()
            shutil.rmtree(b.home, ignore_errors=True)  # bench_broker leaves its homes behind
    lat, boxes, reruns, missing = [], [], 0, 0
    for i, tid in enumerate(task_of):
        r = recs.get(tid)
        if r is None or r.finished_at is None or r.state != "completed":
            missing += 1
            continue
        lat.append((r.finished_at - sent_at[i]) * 1000)
        boxes.append(r.box)
        reruns += r.attempts > 1
    if missing:
        raise BenchError(f"part {part}, {label}: {missing} of {n} tasks not completed in the journal "
                         f"although the brokers counted them")
    where = per_box(boxes) if shared else "-"
    return [label, f"{n}", f"{n / secs:,.0f}", f"{pct(lat, 50):.0f}", f"{pct(lat, 95):.0f}", where,
            " ".join(str(c) for c in ran), f"{reruns}"]


def part1(dbs: Databases, box_counts: list[int], n: int, window: int) -> list[str]:
    """Each configuration on its own (fresh database, its own processes): one that fails
    gets a FAILED row and the others still run. Returns the failures."""
    rows, failures = [], []

    def config(label: str, k: int, shared: bool, sqlite: bool = False) -> None:
        url = "" if sqlite else dbs.fresh()
        if sqlite:
            env, records = {}, lambda b: sqlite_records(b[0].home / "var" / "data" / "journal.sqlite3")
        else:
            env, records = {"DATABASE_URL": url}, lambda _b: pg_records(url)
        try:
            rows.append(noop_config(label, k, n, window, env, shared, records))
        except (BenchTimeout, BenchError) as exc:
            print(f"{at()} FAILED: {exc}", flush=True)
            failures.append(str(exc))
            rows.append([label, f"{n}", "FAILED", "-", "-", "-", "-", "-"])

    for k in box_counts:
        config(f"shared queue, {k} box{'es' if k > 1 else ''}", k, True)
    config("1 box, QUEUE_SCOPE=box, PostgreSQL", 1, False)
    config("1 box, QUEUE_SCOPE=box, SQLite", 1, False, sqlite=True)
    table(f"1. no-op tasks through k brokers (stub worker with 64 slots each), {window} submits in flight in all, "
          f"round robin; PostgreSQL: {dbs.where()}",
          ["configuration", "tasks", "tasks/s", "submit->completed p50 ms", "p95 ms", "ran (records' box)",
           "completed per broker (stats)", "attempts>1"], rows)
    print("(latency includes the wait behind the window: about window / throughput)")
    return failures


def part3(dbs: Databases, box_counts: list[int], n: int, service_ms: float) -> list[str]:
    """Capacity-bound work that does not share the CPU: each box's stub worker serves one
    task at a time in `service_ms` (a sleep, as an instance whose work is on its own GPU
    costs this machine's cores nothing). What the shared queue itself scales to, apart
    from this machine's cores, which part 2's boxes must share."""
    rows, failures, base = [], [], None
    window = 8 * max(box_counts)
    for k in box_counts:
        url = dbs.fresh()
        label = f"shared queue, {k} box{'es' if k > 1 else ''}"
        try:
            row = noop_config(label, k, n, window, {"DATABASE_URL": url}, True, lambda _b, url=url: pg_records(url),
                              slots=1, service_ms=service_ms, part=3)
        except (BenchTimeout, BenchError) as exc:
            print(f"{at()} FAILED: {exc}", flush=True)
            failures.append(str(exc))
            rows.append([label, f"{n}", "FAILED", "-", "-", "-", "-", "-", "-"])
            continue
        rate = float(row[2].replace(",", ""))
        base = base or rate
        rows.append(row[:3] + [f"{rate / base:.2f}x"] + row[3:])
    table(f"3. tasks of {service_ms:g} ms on k boxes (one stub instance with 1 slot each, sleeping, not computing), "
          f"{window} submits in flight in all, round robin; PostgreSQL: {dbs.where()}",
          ["configuration", "tasks", "tasks/s", "vs 1 box", "submit->completed p50 ms", "p95 ms",
           "ran (records' box)", "completed per broker (stats)", "attempts>1"], rows)
    return failures


# ------------------------------------------------------------------ part 2: whole appliances
def _load_appliance():
    from bench_api import Appliance
    from bench_routing import shut_down

    class Box(Appliance):
        """bench_api's Appliance as one box of the shared queue, with a bounded stop that
        kills whatever its session left behind (bench_routing's)."""

        def __init__(self, name: str, label: str, verbose: bool, **env):
            self.name, self.label = name, label
            self.error_lines: list[str] = []
            report = io.StringIO()
            with contextlib.redirect_stdout(report):  # bench_api prints its settings block: once is enough
                super().__init__(**env)
            if verbose:
                print(report.getvalue().rstrip(), flush=True)
            import requests

            self.http = threading.local()
            self.requests = requests

        def session(self):
            if not hasattr(self.http, "s"):
                self.http.s = self.requests.Session()
                self.http.s.headers.update(self.auth)
            return self.http.s

        def stats(self) -> dict:
            r = self.session().get(self.url + "/v1/async/stats", timeout=10)
            r.raise_for_status()
            return r.json()

        def stop(self) -> None:
            t0 = time.monotonic()
            shut_down(self.home, self.proc, self.name)
            print(f"{at()} [{self.name}] stopped in {time.monotonic() - t0:.1f} s", flush=True)
            logs = self.home / "var" / "log"
            for f in sorted(logs.glob("*.log")):  # ERROR lines: evidence for the report
                self.error_lines += [f"{f.name}: {line}" for line in f.read_text(errors="replace").splitlines()
                                     if " ERROR " in line or "Traceback" in line]
            dest = LOG_KEEP / self.label
            shutil.rmtree(dest, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copytree(logs, dest)
            shutil.rmtree(self.home, ignore_errors=True)

    return Box


def wait_until(what: str, bound_s: float, probe) -> None:
    """probe() -> None when done, else a description of what is still missing."""
    deadline = time.monotonic() + bound_s
    while (missing := probe()) is not None:
        if time.monotonic() > deadline:
            raise BenchTimeout(f"{what}: {missing} after {bound_s:.0f} s")
        time.sleep(0.3)


def start_boxes(Box, k: int, url: str, model: Path, verbose: bool) -> list:
    """k appliances on the shared queue in `url`; each has its instance up and sees all k boxes."""
    boxes = []
    try:
        for i in range(k):
            t0 = time.monotonic()
            boxes.append(Box(f"box{i + 1}", f"k{k}-box{i + 1}", verbose and i == 0, **LIFTED, QUEUE_SCOPE="shared",
                             BOX_NAME=f"box{i + 1}", DATABASE_URL=url, LLAMA_INSTANCES=1, LLAMA_THREADS=1,
                             LLAMA_SLOTS=2, MODEL_PATH=str(model), API_WORKERS=1))
            b = boxes[-1]

            def instance_up(b=b):
                st = b.stats()
                return None if st["workers"] else "no llama.cpp instance registered"
            wait_until(f"[{b.name}]", 120, instance_up)
            print(f"{at()} [{b.name}] up on port {b.port} in {time.monotonic() - t0:.1f} s", flush=True)

        def all_seen():
            seen = [sorted(b.stats()["boxes"]) for b in boxes]
            short = [f"{b.name} sees {s}" for b, s in zip(boxes, seen) if len(s) < k]
            return "; ".join(short) if short else None
        wait_until(f"{k} boxes' membership", 30 + 3 * 15, all_seen)
        return boxes
    except BaseException:
        stop_all(boxes)
        raise


def stop_all(boxes: list) -> None:
    """Stop the boxes at once (each shutdown is bounded), whatever happens to one of them."""
    threads = [threading.Thread(target=b.stop, daemon=True) for b in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)


class Run:
    def __init__(self, n: int):
        self.n = n
        self.lock = threading.Lock()
        self.next = 0
        self.done: list[dict] = []             # per completed task: t0, rec (its status), tokens, via
        self.errors: list[str] = []
        self.inflight: dict[str, str] = {}     # task id -> the box whose API accepted it
        self.last_progress = time.monotonic()  # a submit answered or a task completed
        self.stop = threading.Event()

    def fail(self, why: str) -> None:
        with self.lock:
            self.errors.append(why[:400])
        self.stop.set()  # one failure fails the configuration: the other clients stop early


def chat_body(i: int, max_tokens: int, rng: random.Random) -> dict:
    from appliance.llama.tinymodel import _WORDS

    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12)))
    return {"type": "chat", "messages": [{"role": "user", "content": f"task {i}: {words}"}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "timeout_s": 3600}


def client(box, bodies: list[dict], run: Run, deadline: float) -> None:
    """Take the next task, submit it through `box`, poll its status there until final;
    repeat. One of --inflight such clients per box. Gives up at `deadline` or when
    run.stop is set (another client failed, or the run stalled)."""
    s = box.session()
    while not run.stop.is_set():
        with run.lock:
            i = run.next
            if i >= len(bodies):
                return
            run.next += 1
        t0 = time.time()
        task_id = ""
        try:
            r = s.post(box.url + "/v1/async/submit", json=bodies[i], timeout=30)
            if r.status_code != 202:
                raise BenchError(f"[{box.name}] submit answered {r.status_code}: {r.text[:300]}")
            task_id = r.json()["task_id"]
            with run.lock:
                run.inflight[task_id] = box.name
                run.last_progress = time.monotonic()
            pause = 0.05
            while True:
                rec = s.get(f"{box.url}/v1/async/status/{task_id}", timeout=30).json()
                if rec.get("state") in FINAL:
                    break
                if time.time() > deadline:
                    raise BenchError(f"[{box.name}] task {task_id} not final by the bound (state "
                                     f"{rec.get('state')}, box {rec.get('box')}, attempts {rec.get('attempts')})")
                if run.stop.is_set():
                    return
                time.sleep(pause)
                pause = min(0.25, pause * 1.5)
            if rec["state"] != "completed":
                raise BenchError(f"[{box.name}] task {task_id} {rec['state']}: {rec.get('error')}")
            res = s.get(f"{box.url}/v1/async/result/{task_id}", timeout=30).json()
            tokens = (res.get("result") or {}).get("completion_tokens", 0)
        except (BenchError, box.requests.RequestException, ValueError, KeyError) as exc:
            run.fail(f"{type(exc).__name__}: {exc}")
            return
        with run.lock:
            run.inflight.pop(task_id, None)
            run.done.append({"t0": t0, "rec": rec, "tokens": tokens, "via": box.name})
            run.last_progress = time.monotonic()


def drive(boxes: list, bodies: list[dict], clients_per_box: int, bound_s: float, stall_s: float, what: str) -> Run:
    """Run the clients to the end; BenchTimeout when nothing moves for stall_s or the
    bound passes, BenchError when a task fails (with what the boxes say of the tasks
    still in flight)."""
    run = Run(len(bodies))
    deadline = time.time() + bound_s
    threads = [threading.Thread(target=client, args=(b, bodies, run, deadline), daemon=True)
               for b in boxes for _ in range(clients_per_box)]
    for t in threads:
        t.start()
    why = None
    try:
        while any(t.is_alive() for t in threads):
            if run.stop.is_set():
                break
            idle = time.monotonic() - run.last_progress
            if idle > stall_s:
                why = f"no task completed for {idle:.0f} s"
                break
            if time.time() > deadline + 60:  # the clients give up at the deadline by themselves
                why = f"the clients did not return {bound_s:.0f} s + 60 s after the start"
                break
            time.sleep(0.2)
    finally:
        run.stop.set()
        for t in threads:
            t.join(40)  # a request in progress times out within 30 s
    if why or run.errors:
        detail = evidence(boxes, run)
        if why:
            raise BenchTimeout(f"{what}: {len(run.done)} of {run.n} tasks completed, {why}; {detail}")
        raise BenchError(f"{what}: {len(run.errors)} client(s) failed; first: {' | '.join(run.errors[:3])}; {detail}")
    if len(run.done) != run.n:
        raise BenchError(f"{what}: {len(run.done)} of {run.n} tasks completed")
    return run


def evidence(boxes: list, run: Run, limit: int = 4) -> str:
    """What the boxes say: their queues, and the status of a few tasks still in flight (never raises)."""
    out = []
    by_name = {b.name: b for b in boxes}
    for b in boxes:
        try:
            st = b.stats()
            out.append(f"{b.name}: {st['queued']} queued, {st['running']} running, shared_queued "
                       f"{st.get('shared_queued')}, boxes {st.get('boxes')}, {len(st['workers'])} instance(s)")
        except Exception as exc:  # noqa: BLE001  (evidence only)
            out.append(f"{b.name}: stats unavailable ({type(exc).__name__})")
    for task_id, via in list(run.inflight.items())[:limit]:
        try:
            rec = by_name[via].session().get(f"{by_name[via].url}/v1/async/status/{task_id}", timeout=10).json()
            out.append(f"{task_id} (via {via}): state {rec.get('state')}, box {rec.get('box')}, "
                       f"attempts {rec.get('attempts')}, worker {rec.get('worker')}")
        except Exception as exc:  # noqa: BLE001
            out.append(f"{task_id} (via {via}): status unavailable ({type(exc).__name__})")
    return "; ".join(out)


def model_config(boxes: list, n: int, inflight: int, max_tokens: int, bound_s: float, stall_s: float) -> dict:
    k = len(boxes)
    label = f"part 2, {k} box{'es' if k > 1 else ''}"
    rng = random.Random(k)
    # warm-up, not measured: one short chat through each box, all at once
    drive(boxes, [chat_body(10_000 + j, 8, rng) for j in range(k)], 1, 120, stall_s, f"{label}, warm-up")
    bodies = [chat_body(i, max_tokens, rng) for i in range(n)]
    print(f"{at()} {label}: {n} chats of {max_tokens} tokens, {inflight} in flight per box ({inflight * k} in all)",
          flush=True)
    run = drive(boxes, bodies, inflight, bound_s, stall_s, label)
    lat = [d["rec"]["finished_at"] - d["t0"] for d in run.done]
    wait = [d["rec"]["started_at"] - d["t0"] for d in run.done]  # submit -> its (last) dispatch
    span = max(d["rec"]["finished_at"] for d in run.done) - min(d["t0"] for d in run.done)
    tokens = [d["tokens"] for d in run.done]
    return {"k": k, "n": n, "span": span, "rate": n / span, "p50": pct(lat, 50), "p95": pct(lat, 95),
            "w50": pct(wait, 50), "w95": pct(wait, 95),
            "tokens": sum(tokens) / n, "tok_min": min(tokens), "tok_s": sum(tokens) / span,
            "ran": per_box([d["rec"].get("box") for d in run.done]),
            "elsewhere": sum(d["rec"].get("box") != d["via"] for d in run.done),
            "reruns": sum(d["rec"].get("attempts", 0) > 1 for d in run.done)}


def part2(dbs: Databases, box_counts: list[int], n: int, inflight: int, max_tokens: int, n_layer: int,
          bound_s: float, stall_s: float) -> list[str]:
    """Each box count on its own (fresh database, its own appliances): one that fails gets
    a FAILED row and the others still run. Returns the failures."""
    from appliance.llama.tinymodel import TinySpec, write_tiny_model

    for key in CONTROLLED:
        if key in os.environ:
            print(f"note: the caller's {key} is not used (the benchmark sets it per box)")
            del os.environ[key]
    Box = _load_appliance()
    workdir = Path(tempfile.mkdtemp(prefix="bench-boxes-"))
    results, failures = [], []
    try:
        model = write_tiny_model(workdir / "bench-boxes.gguf",
                                 TinySpec(n_embd=512, n_layer=n_layer, n_ff=2048, n_ctx=4096))
        print(f"{at()} model: {model.stat().st_size / 1e6:.0f} MB random-weight llama GGUF (n_embd 512, n_layer "
              f"{n_layer}, n_ff 2048); per box 1 instance, 1 thread, 2 slots", flush=True)
        for i, k in enumerate(box_counts):
            url = dbs.fresh()
            try:
                boxes = start_boxes(Box, k, url, model, verbose=i == 0)
                try:
                    results.append(model_config(boxes, n, inflight, max_tokens, bound_s, stall_s))
                finally:
                    stop_all(boxes)
                    errors = [f"{b.name} {line}" for b in boxes for line in b.error_lines]
                    if results and results[-1]["k"] == k:
                        results[-1]["errors"] = len(errors)
                    if errors:
                        print(f"{at()} {len(errors)} ERROR line(s) in the boxes' logs (kept in {LOG_KEEP}/k{k}-*), "
                              "e.g.:\n  " + "\n  ".join(errors[:3]), flush=True)
            except RuntimeError as exc:  # BenchTimeout, BenchError, or an appliance that did not start (bench_api)
                print(f"{at()} FAILED: {exc}", flush=True)
                failures.append(str(exc))
                results.append({"k": k, "n": n, "failed": True})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = next((r["rate"] for r in results if r["k"] == 1 and "failed" not in r), None)
    rows = []
    for r in results:
        if "failed" in r:
            rows.append([f"{r['k']}", f"{r['n']}", "FAILED"] + ["-"] * 12)
            continue
        rows.append([f"{r['k']}", f"{r['n']}", f"{r['span']:.1f}", f"{r['rate']:.2f}",
                     f"{r['rate'] / base:.2f}x" if base else "-", f"{r['p50']:.1f}", f"{r['p95']:.1f}",
                     f"{r['w50']:.1f}", f"{r['w95']:.1f}", f"{r['tokens']:.0f} (min {r['tok_min']})",
                     f"{r['tok_s']:.0f}", r["ran"], f"{r['elsewhere']}", f"{r['reruns']}", f"{r.get('errors', '-')}"])
    table(f"2. chat tasks ({max_tokens} tokens asked) on k whole appliances sharing one queue; {inflight} in flight "
          f"per box through its own API; 1 instance x 2 slots (1 reserved for critical/high) per box; "
          f"os.cpu_count() = {os.cpu_count()}, shared by all boxes",
          ["boxes", "tasks", "seconds", "tasks/s", "vs 1 box", "latency p50 s", "p95 s", "wait p50 s", "p95 s",
           "tokens/task", "tokens/s", "ran (status's box)", "ran elsewhere", "attempts>1", "log ERRORs"], rows)
    print("(seconds: first submit -> last finished_at; latency: submit -> the record's finished_at; wait: submit ->\n"
          " the record's started_at (queue wait); ran elsewhere: tasks run on another box than the one whose API\n"
          f" accepted them; log ERRORs: ERROR lines in the boxes' logs, kept in {LOG_KEEP})")
    if (os.cpu_count() or 0) <= 2 and max(box_counts) > 2:
        print(f"(on {os.cpu_count()} cores a third box only shares the same cores: k=3 cannot scale over k=2 here)")
    return failures


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--boxes", default="1,2,3", help="box counts to run, e.g. 1,2")
    ap.add_argument("--n", type=int, default=None,
                    help="tasks per configuration (default: 20000 in part 1, 48 in part 2)")
    ap.add_argument("--window", type=int, default=1000, help="part 1: unacknowledged submits in flight, in all")
    ap.add_argument("--inflight", type=int, default=4, help="part 2: tasks in flight per box (its slots: 2)")
    ap.add_argument("--max-tokens", type=int, default=256, help="part 2: tokens each chat asks for")
    ap.add_argument("--service-ms", type=float, default=50, help="part 3: each task's time on its instance")
    ap.add_argument("--n-layer", type=int, default=8, help="part 2: layers of the generated model (8: ~136 MB)")
    ap.add_argument("--bound-s", type=float, default=600, help="part 2: how long a configuration's tasks may take")
    ap.add_argument("--stall-s", type=float, default=bench_broker.STALL_S,
                    help="part 1: give up a wait after this many seconds without progress")
    ap.add_argument("--model-stall-s", type=float, default=120,
                    help="part 2: give up when no task completed for this many seconds")
    ap.add_argument("--database-url", default="",
                    help="a PostgreSQL scratch database (its appliance tables are DROPPED); default: a throwaway "
                         "cluster started and removed by the benchmark")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    box_counts = [int(k) for k in args.boxes.split(",")]
    if not parts <= {1, 2, 3} or not box_counts or min(box_counts) < 1:
        ap.error("--parts takes 1, 2 and/or 3, --boxes positive counts")
    bench_broker.STALL_S = args.stall_s
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop what was started
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: os.cpu_count() = {os.cpu_count()}" + (f" ({usable} usable)" if usable != os.cpu_count() else "")
          + f", Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    t_start = time.monotonic()
    failures: list[str] = []
    try:
        with Databases(args.database_url) as dbs:
            if 1 in parts:
                failures += part1(dbs, box_counts, args.n or 20_000, args.window)
            if 2 in parts:
                failures += part2(dbs, box_counts, args.n or 48, args.inflight, args.max_tokens, args.n_layer,
                                  args.bound_s, args.model_stall_s)
            if 3 in parts:
                failures += part3(dbs, box_counts, args.n or 600, args.service_ms)
    except RuntimeError as exc:  # BenchTimeout, BenchError, PostgreSQL that did not start
        failures.append(str(exc))
    finally:
        print(f"\nwall time {time.monotonic() - t_start:.0f} s", flush=True)
    if failures:
        sys.stdout.flush()
        for why in failures:
            print(f"bench_boxes: FAILED: {why}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
