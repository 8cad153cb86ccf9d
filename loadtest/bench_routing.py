"""Routing benchmarks against real appliances it starts itself (temp homes, fresh secrets).

    .venv/bin/python loadtest/bench_routing.py [--quick] [--p1-seconds 45 ...]

One generated random-weight llama GGUF (TinySpec n_embd=512, n_layer=8, n_ff=2048:
~136 MB of F32, ~180 tokens/s on one thread) is written once into a temp dir and served
by every instance (1 thread, 2 slots each), so service times are realistic while no
download is needed.

1. Skewed load over three instances: a Poisson arrival schedule (fixed seed) of mostly
   short and some long generations, at a rate calibrated to ~75 % of the measured
   capacity, replayed (a) through the appliance with reserved_slots = 0 and (b) by a
   minimal round-robin client straight to the same three llama.cpp servers, then (c)
   through an appliance with the default reservation (1 slot per instance).
2. Multi-turn chat: concurrent conversations that resend their whole history each turn,
   through the appliance with affinity (one session_id per conversation) and without
   it (a unique session_id per turn, so no two turns share a routing key): the share
   of already-sent prompt tokens that llama.cpp took from its cache.
3. Critical latency under overload: two instances flooded with long `batch` work at
   ~10x capacity and a trickle of short `critical` tasks; their wait (started_at -
   created_at) with reserved slots, without reservation or preemption, and without
   reservation but with preemption after CRITICAL_MAX_WAIT_MS=200.

Every wait is bounded: on a bound the script names what is missing and exits 1. Each
appliance is shut down in a finally (supervisorctl shutdown, then any process left in
its session is killed by pid); its logs are kept under /tmp/bench-routing-logs/.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import Appliance, _pct, cores  # noqa: E402  (the appliance start/stop pattern)

from appliance.llama.tinymodel import _WORDS, TinySpec, write_tiny_model  # noqa: E402

ALIAS = "bench-llama"
LOG_KEEP = Path("/tmp/bench-routing-logs")
T0 = time.monotonic()
# Settings the benchmark decides per appliance: a caller's value would silently change what a part measures.
CONTROLLED = ("INSTANCES_FILE", "AFFINITY_SLACK", "CRITICAL_MAX_WAIT_MS", "QUEUE_MAX_SIZE", "RATE_LIMITS",
              "TASK_TIMEOUT_MAX_S", "LLAMA_INSTANCES")
LIFTED = {"QUEUE_MAX_SIZE": 200_000, "TASK_TIMEOUT_MAX_S": 3600,
          "RATE_LIMITS": "tasks:write=100000/s:100000,tasks:read=100000/s:100000"}
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}  # what the launcher sends


def at() -> str:
    return f"[{time.monotonic() - T0:.0f} s]"


class BenchError(RuntimeError):
    """A bound was hit or the appliance misbehaved: the message says what and where."""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


# --------------------------------------------------------------------------- appliance
class RoutedAppliance(Appliance):
    """bench_api's Appliance (temp home, fresh secrets, minted token, /readyz) with an
    instances file, a wait for every instance to register, and a stop that keeps the
    logs (evidence) and kills whatever its session left behind."""

    def __init__(self, label: str, workdir: Path, model: Path, n: int, reserved: int | None, ctx: int,
                 verbose: bool, **env):
        self.label = label
        self.http = threading.local()  # one requests.Session per client thread
        lines = []
        for i in range(n):
            lines += ["[[instance]]", f'name = "llama-{i}"', f'model = "{model}"', f'alias = "{ALIAS}"',
                      "slots = 2", "threads = 1", f"ctx = {ctx}"]
            if reserved is not None:
                lines.append(f"reserved_slots = {reserved}")
        inst_file = workdir / f"{label}.toml"
        inst_file.write_text("\n".join(lines) + "\n")
        report = io.StringIO()
        with contextlib.redirect_stdout(report):  # bench_api prints its settings block; once is enough
            super().__init__(INSTANCES_FILE=str(inst_file), **{**LIFTED, **env})
        if verbose:
            print(report.getvalue().rstrip())
        try:
            self.wait_workers(n)
        except BaseException:
            self.stop()
            raise
        s = self.settings
        print(f"{at()} [{label}] {n} instances x 2 slots, reserved per instance: "
              f"{reserved if reserved is not None else 'default (1)'}; AFFINITY_SLACK={s.affinity_slack} "
              f"CRITICAL_MAX_WAIT_MS={s.critical_max_wait_ms:g} QUEUE_MAX_SIZE={s.queue_max_size} "
              f"QUEUE_AGING_S={s.queue_aging_s:g}", flush=True)

    def session(self) -> requests.Session:
        if not hasattr(self.http, "s"):
            self.http.s = requests.Session()
            self.http.s.headers.update(self.auth)
        return self.http.s

    def stats(self) -> dict:
        return self.session().get(self.url + "/v1/async/stats", timeout=10).json()

    def wait_workers(self, n: int, bound_s: float = 120) -> None:
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            if len(self.stats()["workers"]) >= n:
                return
            time.sleep(0.3)
        raise BenchError(f"[{self.label}] only {len(self.stats()['workers'])} of {n} instances registered "
                         f"after {bound_s:.0f} s (logs: {LOG_KEEP / self.label})")

    def servers(self) -> list[tuple[str, str, str]]:
        """(name, base URL, API key) of each llama.cpp server, by name."""
        ws = sorted(self.stats()["workers"], key=lambda w: w["name"])
        return [(w["name"], w["endpoint"], (self.home / "var" / "run" / f"{w['name']}.key").read_text().strip())
                for w in ws]

    def submit(self, body: dict) -> tuple[str, float]:
        t0 = time.time()
        r = self.session().post(self.url + "/v1/async/submit", json=body, timeout=30)
        if r.status_code != 202:
            raise BenchError(f"[{self.label}] submit answered {r.status_code}: {r.text[:300]}")
        return r.json()["task_id"], t0

    def wait_result(self, task_id: str, deadline: float) -> dict | None:
        """The final result record, or None at the deadline (the caller reports it)."""
        pause = 0.02
        while time.time() < deadline:
            r = self.session().get(f"{self.url}/v1/async/result/{task_id}", timeout=30)
            if r.status_code == 200:
                return r.json()
            if r.status_code != 202:
                raise BenchError(f"[{self.label}] result of {task_id} answered {r.status_code}: {r.text[:300]}")
            time.sleep(pause)
            pause = min(0.25, pause * 1.5)
        return None

    def status(self, task_id: str) -> dict:
        return self.session().get(f"{self.url}/v1/async/status/{task_id}", timeout=30).json()

    def evidence(self, task_ids: list[str], limit: int = 5) -> str:
        """Status JSON and log lines of a few task ids, for a report of what went wrong."""
        out = []
        logs = sorted((self.home / "var" / "log").glob("*.log"))
        for tid in task_ids[:limit]:
            try:
                out.append(f"  {tid}: {self.status(tid)}")
            except requests.RequestException as exc:
                out.append(f"  {tid}: status unavailable ({type(exc).__name__})")
            for f in logs:
                out += [f"    {f.name}: {line}" for line in f.read_text(errors="replace").splitlines()
                        if tid in line][:4]
        return "\n".join(out)

    def stop(self) -> None:
        try:
            subprocess_run([str(Path(sys.executable).parent / "supervisorctl"), "-c",
                            str(self.home / "supervisord.conf"), "shutdown"])
            try:
                self.proc.wait(30)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in session_pids(self.proc.pid):  # anything supervisord did not reap
                print(f"[{self.label}] killing leftover pid {pid}", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            dest = LOG_KEEP / self.label
            shutil.rmtree(dest, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copytree(self.home / "var" / "log", dest)
            shutil.rmtree(self.home, ignore_errors=True)


def subprocess_run(cmd: list[str]) -> None:
    import subprocess
    subprocess.run(cmd, capture_output=True, timeout=60)


def session_pids(sid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[3]) == sid and stat[0] != "Z":
            found.append(int(pid))
    return found


# --------------------------------------------------------------------------- part 1
@dataclass
class Job:
    idx: int
    at: float          # seconds after the start
    kind: str          # "short" | "long"
    max_tokens: int
    prompt: str
    seed: int


@dataclass
class Outcome:
    job: Job
    latency: float | None = None   # seconds; None: failed
    finished: float = 0.0          # wall clock
    started: float = 0.0           # wall clock, appliance only (status started_at)
    where: str = ""                # instance or server
    tokens: int = 0
    error: str = ""
    task_id: str = ""


def schedule(rate: float, seconds: float, long_share: float, short_n: int, long_n: int, seed: int) -> list[Job]:
    """Open-loop Poisson arrivals; the same seed gives the same schedule, kinds and prompts."""
    rng, t, jobs = random.Random(seed), 0.0, []
    while (t := t + rng.expovariate(rate)) < seconds:
        long = rng.random() < long_share
        jobs.append(Job(len(jobs), t, "long" if long else "short", long_n if long else short_n,
                        words(rng, rng.randint(4, 8)), rng.randrange(2**31)))
    return jobs


def direct_body(job: Job, tag: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{tag} {job.prompt}"}], "max_tokens": job.max_tokens,
            "seed": job.seed, "cache_prompt": True, **SAMPLING}


def post_direct(server: tuple[str, str, str], body: dict, timeout: float) -> dict:
    r = requests.post(server[1] + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {server[2]}"})
    r.raise_for_status()
    return r.json()


def calibrate(servers, short_n: int, long_n: int, long_share: float) -> dict:
    """Capacity of the mix straight at the servers: single-task service times (one server,
    the others idle), then how many threads' worth of single-task work the machine does
    with every slot of every server busy (one long task per slot, all at once: on 2 cores
    three 1-thread servers share the CPU, so this is well under the slot count)."""
    rng = random.Random(99)
    one = {}
    for kind, n, reps in (("short", short_n, 5), ("long", long_n, 2)):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            post_direct(servers[0], {"messages": [{"role": "user", "content": "cal " + words(rng, 6)}],
                                     "max_tokens": n, "seed": 1, **SAMPLING}, 120)
            ts.append(time.perf_counter() - t0)
        one[kind] = sorted(ts)[len(ts) // 2]
    slots = [servers[i % len(servers)] for i in range(2 * len(servers))]
    bodies = [{"messages": [{"role": "user", "content": f"par {i} " + words(rng, 6)}], "max_tokens": long_n,
               "seed": 1, **SAMPLING} for i in range(len(slots))]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(slots)) as ex:
        list(ex.map(lambda sb: post_direct(sb[0], sb[1], 300), zip(slots, bodies)))
    parallel = len(slots) * one["long"] / (time.perf_counter() - t0)
    work = long_share * one["long"] + (1 - long_share) * one["short"]  # thread-seconds per task
    return {"short_s": one["short"], "long_s": one["long"], "parallel": parallel, "capacity": parallel / work}


def replay(jobs: list[Job], send, bound_s: float) -> tuple[list[Outcome], float]:
    """Start each job at its time on its own pool thread (open loop: a slow answer never
    delays the next arrival); the outcomes and the wall-clock start."""
    start = time.time() + 0.5
    outcomes: list[Outcome] = []
    with cf.ThreadPoolExecutor(max_workers=256) as ex:
        futures = []
        for job in jobs:
            time.sleep(max(0.0, start + job.at - time.time()))
            futures.append(ex.submit(send, job, start + jobs[-1].at + bound_s))
        for f in futures:
            outcomes.append(f.result())
    return outcomes, start


def send_rr(servers, tag: str):
    def send(job: Job, deadline: float) -> Outcome:
        server = servers[job.idx % len(servers)]
        t0 = time.time()
        try:
            data = post_direct(server, direct_body(job, tag), max(1.0, deadline - t0))
        except requests.RequestException as exc:
            return Outcome(job, error=f"{type(exc).__name__}: {exc}"[:200], where=server[0])
        t1 = time.time()
        return Outcome(job, t1 - t0, t1, where=server[0], tokens=data["usage"]["completion_tokens"])
    return send


def send_appliance(app: RoutedAppliance, tag: str):
    def send(job: Job, deadline: float) -> Outcome:
        body = {"type": "chat", "model": ALIAS, "max_tokens": job.max_tokens, "seed": job.seed,
                "temperature": SAMPLING["temperature"], "timeout_s": 3600,
                "messages": [{"role": "user", "content": f"{tag} {job.prompt}"}]}
        try:
            task_id, t0 = app.submit(body)
            rec = app.wait_result(task_id, deadline)
        except (requests.RequestException, BenchError) as exc:
            return Outcome(job, error=f"{type(exc).__name__}: {exc}"[:300])
        if rec is None:
            return Outcome(job, error=f"{task_id}: not final by the bound", task_id=task_id)
        if rec["state"] != "completed":
            return Outcome(job, error=f"{task_id}: {rec['state']} {rec.get('error')}", task_id=task_id)
        res = rec["result"]
        try:
            started = app.status(task_id)["started_at"]
        except (requests.RequestException, KeyError):
            started = 0.0
        # finished_at is the broker's clock (same machine): no polling granularity in the latency
        return Outcome(job, rec["finished_at"] - t0, rec["finished_at"], started=started,
                       where=res["provenance"]["instance"], tokens=res["completion_tokens"], task_id=task_id)
    return send


def checked(app: RoutedAppliance, run: tuple[list[Outcome], float]) -> tuple[list[Outcome], float]:
    """Print the evidence (status, log lines) of failed tasks while the appliance still runs."""
    failed = [o.task_id for o in run[0] if o.error and o.task_id]
    if failed:
        print(f"[{app.label}] {len(failed)} task(s) failed; the first ones:\n{app.evidence(failed)}", flush=True)
    return run


def latency_rows(outcomes: list[Outcome], start: float) -> dict[str, tuple]:
    rows = {}
    for kind in ("short", "long", "all"):
        sel = [o for o in outcomes if kind in ("all", o.job.kind)]
        ok = [o for o in sel if o.latency is not None]
        lat = [o.latency * 1000 for o in ok]
        span = max(o.finished for o in ok) - start if ok else 1.0
        rows[kind] = (len(sel), len(sel) - len(ok), len(ok) / span,
                      *(_pct(lat, p) if lat else float("nan") for p in (50, 95, 99)))
    return rows


def parts12(args, model: Path, workdir: Path, out: dict) -> None:
    """Part 1 (and part 2 on the same appliances: their llama.cpp caches do not hold part 2's prompts)."""
    print(f"\n== 1. skewed load over 3 instances ({100 * (1 - args.long_share):.0f} % {args.short_tokens}-token, "
          f"{100 * args.long_share:.0f} % {args.long_tokens}-token chats), Poisson arrivals, seed {args.seed}",
          flush=True)
    runs: dict[str, tuple[list[Outcome], float]] = {}
    app = RoutedAppliance("p1-reserved0", workdir, model, 3, 0, args.ctx, True)
    try:
        servers = app.servers()
        if args.rate:
            rate = args.rate
            print(f"rate {rate:.2f} tasks/s (given)")
        else:
            cal = calibrate(servers, args.short_tokens, args.long_tokens, args.long_share)
            out["cal"] = cal
            rate = args.load * cal["capacity"]
            print(f"calibration (straight to the servers): one task alone: {args.short_tokens} tokens "
                  f"{1000 * cal['short_s']:.0f} ms, {args.long_tokens} tokens {1000 * cal['long_s']:.0f} ms; "
                  f"all 6 slots busy: {cal['parallel']:.2f} threads' worth of work; capacity for the mix "
                  f"{cal['capacity']:.2f} tasks/s -> offered {rate:.2f} tasks/s ({100 * args.load:.0f} %)",
                  flush=True)
        jobs = schedule(rate, args.p1_seconds, args.long_share, args.short_tokens, args.long_tokens, args.seed)
        print(f"{at()} schedule: {len(jobs)} tasks over {args.p1_seconds:g} s "
              f"({sum(j.kind == 'long' for j in jobs)} long)", flush=True)
        if "1" in args.parts:
            runs["round-robin, direct to llama.cpp"] = replay(jobs, send_rr(servers, "rr"), args.bound_s)
            runs["appliance, reserved_slots = 0"] = checked(app, replay(jobs, send_appliance(app, "ap"), args.bound_s))
        if "2" in args.parts:
            part2(args, app, "reserved_slots = 0", out)
    finally:
        app.stop()
    if not args.quick:
        app = RoutedAppliance("p1-default", workdir, model, 3, None, args.ctx, False)
        try:
            if "1" in args.parts:
                runs["appliance, default reservation (1)"] = checked(
                    app, replay(jobs, send_appliance(app, "dr"), args.bound_s))
            if "2" in args.parts:
                part2(args, app, "default reservation (1)", out)
        finally:
            app.stop()
    if "1" in args.parts:
        print_part1(args, runs, jobs, rate, out)
    if "2" in args.parts:
        print_part2(args, out)


def doubled(outcomes: list[Outcome]) -> str:
    """How often the router started a task on an instance already running one while another
    instance ran nothing (from the tasks' own started_at/finished_at): on a 1-thread CPU
    instance the two then share one thread and both run at about half speed."""
    ok = [o for o in outcomes if o.latency is not None and o.started]
    names = sorted({o.where for o in ok})
    n = 0
    for o in ok:
        load = {w: sum(1 for p in ok if p is not o and p.where == w and p.started <= o.started < p.finished)
                for w in names}
        n += load[o.where] >= 1 and min(load.values()) == 0
    return f"started beside a running task while another instance ran none: {n} of {len(ok)}"


def print_part1(args, runs, jobs, rate, out) -> None:
    print(f"\n1. skewed load: {len(jobs)} tasks, offered {rate:.2f} tasks/s, same schedule (seed {args.seed}) "
          f"for every row; latency = submit -> final, ms")
    print(f"{'system':38}{'kind':>6}{'tasks':>7}{'failed':>7}{'tasks/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}"
          f"{'tokens':>8}")
    rows = {}
    for name, (outcomes, start) in runs.items():
        rows[name] = latency_rows(outcomes, start)
        for kind, (n, failed, tput, p50, p95, p99) in rows[name].items():
            toks = sum(o.tokens for o in outcomes if kind in ("all", o.job.kind))
            print(f"{name if kind == 'short' else '':38}{kind:>6}{n:>7}{failed:>7}{tput:>9.2f}{p50:>8.0f}"
                  f"{p95:>8.0f}{p99:>8.0f}{toks:>8}")
        where: dict[str, int] = {}
        for o in outcomes:
            where[o.where] = where.get(o.where, 0) + 1
        print(f"{'':38}tasks per instance: " + ", ".join(f"{k or '?'} {v}" for k, v in sorted(where.items())))
        if name.startswith("appliance"):
            print(f"{'':38}{doubled(outcomes)}")
        errors = [o.error for o in outcomes if o.error]
        if errors:
            print(f"{'':38}errors ({len(errors)}): " + "; ".join(errors[:5]))
    rr = rows["round-robin, direct to llama.cpp"]
    for name in [n for n in rows if n.startswith("appliance")]:
        gains = ", ".join(f"{k} {100 * (rr[k][4] - rows[name][k][4]) / rr[k][4]:+.0f} %" for k in rr)
        print(f"p95 lower than round-robin ({name}): {gains}; throughput "
              f"{rows[name]['all'][2]:.2f} vs {rr['all'][2]:.2f} tasks/s")
    out["p1_failed"] = sum(r["all"][1] for r in rows.values())


# --------------------------------------------------------------------------- part 2
@dataclass
class Turn:
    conv: int
    n: int
    prompt_tokens: int
    cached: int
    instance: str
    latency: float


def conversation(app: RoutedAppliance, conv: int, turns: int, affinity: bool, tag: str, args,
                 deadline: float, log: list[Turn]) -> None:
    """One user's chat: every turn resends the whole history (a long system prompt of its own first)."""
    rng = random.Random(f"{tag}-{conv}")
    messages = [{"role": "system", "content": f"{tag} {conv} " + words(rng, args.system_words)}]
    session = f"{tag}-conv-{conv}"
    for n in range(turns):
        time.sleep(rng.uniform(0, 0.3))  # think time: interleaves the conversations
        messages.append({"role": "user", "content": words(rng, 10)})
        body = {"type": "chat", "model": ALIAS, "messages": messages, "max_tokens": args.reply_tokens, "seed": n,
                "timeout_s": 600, "session_id": session if affinity else f"{session}-turn-{n}-{uuid.uuid4().hex}"}
        task_id, t0 = app.submit(body)
        rec = app.wait_result(task_id, deadline)
        if rec is None or rec["state"] != "completed":
            raise BenchError(f"part 2: turn {n} of conversation {conv} ({task_id}) "
                             f"{'not final by the bound' if rec is None else rec['state']}:\n"
                             + app.evidence([task_id]))
        res = rec["result"]
        log.append(Turn(conv, n, res["prompt_tokens"], res["cached_tokens"], res["provenance"]["instance"],
                        rec["finished_at"] - t0))
        messages.append({"role": "assistant", "content": res["text"]})


def part2(args, app: RoutedAppliance, config: str, out: dict) -> None:
    for affinity in (True, False):
        mode = "with affinity (a session_id per conversation)" if affinity else \
            "without affinity (a unique session_id per turn)"
        log: list[Turn] = []
        tag = f"{app.label}-{'aff' if affinity else 'noaff'}"
        deadline = time.time() + args.bound_s + 30 * args.turns
        with cf.ThreadPoolExecutor(args.conversations) as ex:
            for f in [ex.submit(conversation, app, c, args.turns, affinity, tag, args, deadline, log)
                      for c in range(args.conversations)]:
                f.result()
        by_conv: dict[int, list[Turn]] = {}
        for t in sorted(log, key=lambda t: (t.conv, t.n)):
            by_conv.setdefault(t.conv, []).append(t)
        repeated = sum(ts[i - 1].prompt_tokens for ts in by_conv.values() for i in range(1, len(ts)))
        # capped per turn: cache_n can exceed the previous prompt (the previous reply's tokens are cached too)
        cached_rep = sum(min(ts[i].cached, ts[i - 1].prompt_tokens) for ts in by_conv.values()
                         for i in range(1, len(ts)))
        total, cached = sum(t.prompt_tokens for t in log), sum(t.cached for t in log)
        moves = sum(ts[i].instance != ts[i - 1].instance for ts in by_conv.values() for i in range(1, len(ts)))
        out.setdefault("p2", []).append((config, mode, len(log), repeated, cached_rep, total, cached, moves,
                                         len(log) - len(by_conv), _pct([t.latency * 1000 for t in log], 50),
                                         _pct([t.latency * 1000 for t in log], 95)))


def print_part2(args, out: dict) -> None:
    print(f"\n2. multi-turn chat: {args.conversations} concurrent conversations x {args.turns} turns, system prompt "
          f"{args.system_words} words, replies {args.reply_tokens} tokens; repeated prefix = the previous turn's "
          f"prompt tokens (turns 2..), cached = llama.cpp's cache_n (capped at the repeated prefix per turn "
          f"in the first pair of columns)")
    print(f"{'appliance':26}{'mode':50}{'turns':>6}{'repeated':>9}{'cached':>8}{'% rep':>7}{'prompt':>8}"
          f"{'cached':>8}{'% all':>7}{'moves':>7}{'p50 ms':>8}{'p95 ms':>8}")
    for config, mode, n, rep, crep, total, cached, moves, later, p50, p95 in out.get("p2", []):
        print(f"{config:26}{mode:50}{n:>6}{rep:>9}{crep:>8}{100 * crep / max(1, rep):>7.1f}{total:>8}{cached:>8}"
              f"{100 * cached / max(1, total):>7.1f}{f'{moves}/{later}':>7}{p50:>8.0f}{p95:>8.0f}")
    print("(moves: turns that ran on another instance than the conversation's previous turn)")


# --------------------------------------------------------------------------- part 3
def part3(args, model: Path, workdir: Path, out: dict) -> None:
    long_s = out.get("cal", {}).get("long_s", args.long_tokens / 180)
    flood = 10 * 4 / long_s  # 10x what 2 instances x 2 slots finish if every slot ran alone at full speed
    configs = [("a: reserved_slots 1 (default), preemption after 1000 ms", "p3-reserved", None, 1000),
               ("b: reserved 0, no preemption (CRITICAL_MAX_WAIT_MS=0)", "p3-nopreempt", 0, 0),
               ("c: reserved 0, preemption after 200 ms", "p3-preempt200", 0, 200)]
    rows = []
    for name, label, reserved, max_wait in configs:
        print(f"\n== 3{name[0]}. flood {flood:.1f} batch tasks/s ({args.long_tokens} tokens) + a critical task "
              f"every {args.critical_every_ms} ms for {args.p3_seconds:g} s", flush=True)
        app = RoutedAppliance(label, workdir, model, 2, reserved, args.ctx, False, CRITICAL_MAX_WAIT_MS=max_wait)
        try:
            rows.append((name, *overload(app, flood, args)))
        finally:
            app.stop()
    print(f"\n3. critical latency under overload: 2 instances x 2 slots, batch flood {flood:.1f} tasks/s "
          f"({args.long_tokens} tokens, ~10x capacity), critical {args.short_tokens}-token chats every "
          f"{args.critical_every_ms} ms; wait = started_at - created_at, ms")
    print(f"{'configuration':58}{'critical':>9}{'p50':>8}{'p95':>8}{'max':>8}{'preemptions':>13}{'batch sub.':>11}"
          f"{'batch done':>11}")
    for name, n, p50, p95, mx, pre, nb, db in rows:
        print(f"{name:58}{n:>9}{p50:>8.1f}{p95:>8.1f}{mx:>8.1f}{pre:>13}{nb:>11}{db:>11}")


def overload(app: RoutedAppliance, flood: float, args) -> tuple:
    stop = threading.Event()
    batch: list[str] = []
    errors: list[str] = []

    def flood_loop() -> None:
        try:
            submit_loop()
        except (requests.RequestException, BenchError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    def submit_loop() -> None:
        body = {"type": "chat", "model": ALIAS, "priority": "batch", "max_tokens": args.long_tokens,
                "timeout_s": 3600, "messages": [{"role": "user", "content": "batch " + words(random.Random(1), 6)}]}
        t0, k = time.time(), 0
        while not stop.is_set():
            batch.append(app.submit(body)[0])
            k += 1
            stop.wait(max(0.0, t0 + k / flood - time.time()))
    flooder = threading.Thread(target=flood_loop, daemon=True)
    flooder.start()
    try:
        time.sleep(2.0)  # let the flood fill every slot and the queue first
        crit, rng, end = [], random.Random(3), time.time() + args.p3_seconds
        while time.time() < end:
            body = {"type": "chat", "model": ALIAS, "priority": "critical", "max_tokens": args.short_tokens,
                    "timeout_s": 120, "messages": [{"role": "user", "content": "urgent " + words(rng, 6)}]}
            crit.append(app.submit(body)[0])
            time.sleep(args.critical_every_ms / 1000)
    finally:
        stop.set()
        flooder.join(30)
    if errors:
        raise BenchError(f"[{app.label}] the batch flood stopped: {errors[0]}")
    deadline = time.time() + 60
    records = {t: app.wait_result(t, deadline) for t in crit}
    missing = [t for t, r in records.items() if r is None or r["state"] != "completed"]
    if missing:
        raise BenchError(f"[{app.label}] {len(missing)} of {len(crit)} critical tasks not completed within 60 s "
                         f"after the trickle:\n" + app.evidence(missing))
    waits = []
    for t in crit:
        st = app.status(t)
        waits.append((st["started_at"] - st["created_at"]) * 1000)
    stats = app.stats()
    return (len(crit), _pct(waits, 50), _pct(waits, 95), max(waits), stats.get("preemptions", "n/a"), len(batch),
            stats["finished"].get("completed", 0) - len(crit))


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (shorter parts, no default-"
                    "reservation run in part 1)")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n-layer", type=int, default=8, help="layers of the generated model (8: ~136 MB)")
    ap.add_argument("--ctx", type=int, default=4096, help="llama.cpp context per instance (split across slots)")
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--long-share", type=float, default=0.2)
    ap.add_argument("--load", type=float, default=0.75, help="offered load as a share of calibrated capacity")
    ap.add_argument("--rate", type=float, default=0.0, help="tasks/s; skips the calibration")
    ap.add_argument("--p1-seconds", type=float, default=45)
    ap.add_argument("--bound-s", type=float, default=120, help="how long after the last arrival a task may take")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-words", type=int, default=80, help="~4.5 tokens per word with this vocabulary")
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--p3-seconds", type=float, default=20)
    ap.add_argument("--critical-every-ms", type=int, default=300)
    args = ap.parse_args()
    if args.quick:
        args.p1_seconds, args.p3_seconds = 15, 6
        args.conversations, args.turns = 4, 4
    t_start = time.monotonic()
    import xllamacpp
    print(f"machine: {cores()}, Python {sys.version.split()[0]}, xllamacpp {getattr(xllamacpp, '__version__', '?')}"
          f", load average {os.getloadavg()[0]:.2f}")
    print("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    for key in CONTROLLED:
        if key in os.environ:
            print(f"note: the caller's {key} is not used (the benchmark sets it per appliance)")
            del os.environ[key]
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    out: dict = {}
    try:
        model = write_tiny_model(workdir / "model.gguf", TinySpec(n_embd=512, n_layer=args.n_layer, n_ff=2048,
                                                                  n_ctx=args.ctx))
        print(f"model: {model.stat().st_size / 1e6:.0f} MB random-weight llama GGUF (n_embd 512, n_layer "
              f"{args.n_layer}, n_ff 2048), 1 thread and 2 slots per instance; logs kept in {LOG_KEEP}", flush=True)
        if "1" in args.parts or "2" in args.parts:
            parts12(args, model, workdir, out)
        if "3" in args.parts:
            part3(args, model, workdir, out)
    except (BenchError, RuntimeError) as exc:  # RuntimeError: an appliance did not start (bench_api)
        print(f"\nFAILED: {exc}", flush=True)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nwall time {time.monotonic() - t_start:.0f} s", flush=True)
    return 1 if out.get("p1_failed") else 0


if __name__ == "__main__":
    sys.exit(main())
