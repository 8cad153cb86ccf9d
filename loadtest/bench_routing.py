"""Routing benchmarks against real appliances it starts itself (temp homes, fresh secrets).

    .venv/bin/python loadtest/bench_routing.py            # all parts, ~6-7 min on 2 cores
    .venv/bin/python loadtest/bench_routing.py --quick    # smoke run, ~2.5 min
    .venv/bin/python loadtest/bench_routing.py --parts 1 --load 0.5

One generated random-weight llama GGUF (TinySpec n_embd=512, n_layer=8, n_ff=2048: 136 MB
of F32, ~180-200 tokens/s on one thread; n_layer=4 gives 68 MB and ~400 tokens/s) is
written once into a temp dir and served by every instance (1 thread, 2 slots each): real
service times with no download.

1. Skewed load over three instances: a Poisson arrival schedule (fixed seed) of mostly
   short and some long chats at ~75 % of the capacity calibrated straight at the
   servers, replayed on the same three llama.cpp servers by: a minimal round-robin
   client (plain requests, as the issue asks), the same client streaming (the request
   the appliance's launcher makes), and the appliance (reserved_slots = 0), in the order
   ABC CBA so that the shared VM's drift hits all alike; then once through a second
   appliance with the default reservation (1 slot per instance). Each replay gets its
   own prompt prefix, so none finds another's prompts in llama.cpp's cache.
2. Multi-turn chat: concurrent conversations that resend their whole history each turn,
   through the appliance with affinity (a session_id per conversation) and without it
   (a unique session_id per turn: no two turns share a routing key; AFFINITY_SLACK=0
   would not do, it still keeps a conversation where loads are equal): the share of the
   already-sent prompt tokens llama.cpp took from its cache. Also with no think time.
3. Critical latency under overload: two instances flooded with long `batch` work at
   ~10x capacity and a trickle of short `critical` tasks; their wait (started_at -
   created_at) with reserved slots, without reservation or preemption, and without
   reservation but with preemption after CRITICAL_MAX_WAIT_MS=200.

Every wait is bounded: on a bound the script names what is missing and exits 1. Each
appliance is shut down in a finally (supervisorctl shutdown, then any process left in
its session is killed by pid), and says how long that took; its logs are kept under
/tmp/bench-routing-logs/<label>/ for evidence.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import Appliance, _pct, cores, cpu_by_program  # noqa: E402  (start/stop, CPU by program)

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
        """supervisorctl shutdown, bounded; then any process left in the appliance's session
        is killed by pid. Says how long it took and which programs supervisord had to SIGKILL."""
        t0 = time.monotonic()
        try:
            shut_down(self.home, self.proc, self.label)
        finally:
            log = self.home / "var" / "log" / "supervisord.log"
            killed = [line.split("killing ")[1].split(" (")[0].strip("'") for line in
                      (log.read_text(errors="replace").splitlines() if log.is_file() else []) if "with SIGKILL" in line]
            print(f"{at()} [{self.label}] stopped in {time.monotonic() - t0:.1f} s"
                  + (f"; supervisord had to SIGKILL {', '.join(killed)} (see supervisord.log)" if killed else ""),
                  flush=True)
            dest = LOG_KEEP / self.label
            shutil.rmtree(dest, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copytree(self.home / "var" / "log", dest)
            shutil.rmtree(self.home, ignore_errors=True)


def shut_down(home: Path, proc: subprocess.Popen, label: str) -> None:
    """supervisorctl shutdown, bounded; then anything left in the appliance's session is
    killed by pid (bench_boxes stops its boxes with this too)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([str(Path(sys.executable).parent / "supervisorctl"), "-c", str(home / "supervisord.conf"),
                        "shutdown"], capture_output=True, timeout=60)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        print(f"[{label}] supervisord still running 60 s after shutdown: killing it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    for pid in session_pids(proc.pid):  # anything supervisord did not reap
        print(f"[{label}] killing leftover pid {pid}", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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


@dataclass
class Replay:
    outcomes: list[Outcome]
    start: float                 # wall clock of the first arrival
    cpu: dict[str, float]        # CPU seconds during the replay: appliance programs, and "client" (this process)


def replay(app: RoutedAppliance, jobs: list[Job], send, bound_s: float) -> Replay:
    """Start each job at its time on its own pool thread (open loop: a slow answer never
    delays the next arrival), with the CPU each program used meanwhile."""
    before, t0 = cpu_by_program(app.proc.pid), os.times()
    start = time.time() + 0.5
    with cf.ThreadPoolExecutor(max_workers=256) as ex:
        futures = []
        for job in jobs:
            time.sleep(max(0.0, start + job.at - time.time()))
            futures.append(ex.submit(send, job, start + jobs[-1].at + bound_s))
        outcomes = [f.result() for f in futures]
    after, t1 = cpu_by_program(app.proc.pid), os.times()
    cpu = {k: v - before.get(k, 0.0) for k, v in after.items()}
    cpu["client"] = t1.user + t1.system - t0.user - t0.system
    return Replay(outcomes, start, cpu)


def send_rr(servers, tag: str, stream: bool):
    """Round-robin in arrival order straight to the servers; `stream`: the same streamed
    request the appliance's launcher makes (llama.cpp then sends every token as an event)."""
    def send(job: Job, deadline: float) -> Outcome:
        server = servers[job.idx % len(servers)]
        body = direct_body(job, tag)
        t0 = time.time()
        try:
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
                usage = {}
                with requests.post(server[1] + "/v1/chat/completions", json=body, stream=True,
                                   timeout=max(1.0, deadline - t0),
                                   headers={"Authorization": f"Bearer {server[2]}"}) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith(b"data: {"):
                            usage = json.loads(line[6:]).get("usage") or usage
            else:
                usage = post_direct(server, body, max(1.0, deadline - t0))["usage"]
        except requests.RequestException as exc:
            return Outcome(job, error=f"{type(exc).__name__}: {exc}"[:200], where=server[0])
        t1 = time.time()
        return Outcome(job, t1 - t0, t1, where=server[0], tokens=usage.get("completion_tokens", 0))
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
                       where=res["provenance"]["instance"], tokens=res.get("completion_tokens", 0),
                       task_id=task_id)
    return send


def checked(app: RoutedAppliance, run: Replay) -> Replay:
    """Print the evidence (status, log lines) of failed tasks while the appliance still runs."""
    failed = [o.task_id for o in run.outcomes if o.error and o.task_id]
    if failed:
        print(f"[{app.label}] {len(failed)} task(s) failed; the first ones:\n{app.evidence(failed)}", flush=True)
    return run


def latency_rows(runs: list[Replay]) -> dict[str, tuple]:
    """Per kind, over every replay of one system: tasks, failed, completed tasks/s, p50/p95/p99 ms, tokens."""
    rows = {}
    for kind in ("short", "long", "all"):
        sel = [o for r in runs for o in r.outcomes if kind in ("all", o.job.kind)]
        ok = [o for o in sel if o.latency is not None]
        lat = [o.latency * 1000 for o in ok]
        span = sum(max((o.finished for o in r.outcomes if o.latency is not None), default=r.start) - r.start
                   for r in runs)
        rows[kind] = (len(sel), len(sel) - len(ok), len(ok) / max(span, 1e-9),
                      *(_pct(lat, p) if lat else float("nan") for p in (50, 95, 99)), sum(o.tokens for o in ok))
    return rows


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
    return f"{n} of {len(ok)}"


RR, RRS, AP0, APD = ("round-robin direct (plain requests)", "round-robin direct (streamed requests)",
                     "appliance, reserved_slots = 0", "appliance, default reservation (1)")


def parts12(args, model: Path, workdir: Path, out: dict) -> None:
    """Part 1, and part 2 on the same appliances (part 2's prompts are its own: no cache carries over)."""
    print(f"\n== 1. skewed load over 3 instances ({100 * (1 - args.long_share):.0f} % {args.short_tokens}-token, "
          f"{100 * args.long_share:.0f} % {args.long_tokens}-token chats), Poisson arrivals, seed {args.seed}",
          flush=True)
    runs: dict[str, list[Replay]] = {}
    app = RoutedAppliance("p1-reserved0", workdir, model, 3, 0, args.ctx, True)
    try:
        servers = app.servers()
        cal = calibrate(servers, args.short_tokens, args.long_tokens, args.long_share)
        out["cal"] = cal
        rate = args.rate or args.load * cal["capacity"]
        print(f"{at()} calibration (straight to the servers): one task alone: {args.short_tokens} tokens "
              f"{1000 * cal['short_s']:.0f} ms, {args.long_tokens} tokens {1000 * cal['long_s']:.0f} ms; all 6 "
              f"slots busy: {cal['parallel']:.2f} threads' worth of work; capacity for the mix "
              f"{cal['capacity']:.2f} tasks/s -> offered {rate:.2f} tasks/s "
              f"({'given' if args.rate else f'{100 * args.load:.0f} %'})", flush=True)
        jobs = schedule(rate, args.p1_seconds, args.long_share, args.short_tokens, args.long_tokens, args.seed)
        out["p1"] = (rate, jobs)
        if "1" in args.parts:
            systems = {RR: lambda tag: send_rr(servers, tag, False), RRS: lambda tag: send_rr(servers, tag, True),
                       AP0: lambda tag: send_appliance(app, tag)}
            order = list(systems) + list(reversed(systems)) * (args.rounds > 1)  # ABC CBA: drift hits all alike
            for i, name in enumerate(order):
                print(f"{at()} replay {i + 1}/{len(order)}: {name}, {len(jobs)} tasks over {args.p1_seconds:g} s",
                      flush=True)
                # a replay's own prompt prefix: no replay finds another's prompts in llama.cpp's cache
                runs.setdefault(name, []).append(checked(app, replay(app, jobs, systems[name](f"r{i}"), args.bound_s)))
        if "2" in args.parts:
            part2(args, app, "reserved_slots = 0", out, saturated=True)
    finally:
        app.stop()
    if not args.quick:
        app = RoutedAppliance("p1-default", workdir, model, 3, None, args.ctx, False)
        try:
            if "1" in args.parts:
                print(f"{at()} replay: {APD}", flush=True)
                runs[APD] = [checked(app, replay(app, jobs, send_appliance(app, "d"), args.bound_s))]
            if "2" in args.parts:
                part2(args, app, "default reservation (1)", out)
        finally:
            app.stop()
    out["p1_runs"] = runs


def print_part1(args, out: dict) -> None:
    rate, jobs = out["p1"]
    runs: dict[str, list[Replay]] = out["p1_runs"]
    print(f"\n1. skewed load: {len(jobs)} tasks per replay ({sum(j.kind == 'long' for j in jobs)} long), offered "
          f"{rate:.2f} tasks/s, the same schedule (seed {args.seed}) in every replay; replays of one appliance's "
          f"servers in the order {' / '.join(n for n in runs if n != APD)}"
          f"{', then reversed' if args.rounds > 1 else ''}"
          f"{f' (then, on a second appliance: {APD})' if APD in runs else ''}; latency = submit -> final, ms; "
          f"CPU = ms per task")
    print(f"{'system':40}{'kind':>6}{'tasks':>7}{'fail':>5}{'tasks/s':>8}{'p50':>7}{'p95':>7}{'p99':>7}{'tokens':>8}"
          f"  CPU: llama  api+broker  client")
    rows = {}
    for name, reps in runs.items():
        rows[name] = latency_rows(reps)
        n = sum(len(r.outcomes) for r in reps)
        cpu = {k: 1000 * sum(r.cpu.get(k, 0.0) for r in reps) / n for k in ("llama", "api", "broker", "client")}
        for kind, (tasks, failed, tput, p50, p95, p99, toks) in rows[name].items():
            extra = f"{cpu['llama']:>13.0f}{cpu['api'] + cpu['broker']:>12.0f}{cpu['client']:>8.0f}" \
                if kind == "all" else ""
            print(f"{name if kind == 'short' else '':40}{kind:>6}{tasks:>7}{failed:>5}{tput:>8.2f}{p50:>7.0f}"
                  f"{p95:>7.0f}{p99:>7.0f}{toks:>8}{extra}")
        per_replay = [latency_rows([r])["all"][4] for r in reps]
        where: dict[str, int] = {}
        for o in (o for r in reps for o in r.outcomes):
            where[o.where] = where.get(o.where, 0) + 1
        note = f"p95 all per replay: {', '.join(f'{v:.0f}' for v in per_replay)}; tasks per instance: " + \
            ", ".join(f"{k or '?'} {v}" for k, v in sorted(where.items()))
        if name.startswith("appliance"):
            note += "; started beside a running task while another instance ran none: " + \
                doubled([o for r in reps for o in r.outcomes])
        print(f"{'':40}{note}")
        errors = [o.error for r in reps for o in r.outcomes if o.error]
        if errors:
            print(f"{'':40}errors ({len(errors)}): " + "; ".join(errors[:5]))
    base = rows[RR]
    for name in [n for n in rows if n != RR]:
        gains = ", ".join(f"{k} {100 * (base[k][4] - rows[name][k][4]) / base[k][4]:+.0f} %" for k in base)
        print(f"p95 lower than {RR} -> {name}: {gains}; throughput {rows[name]['all'][2]:.2f} vs "
              f"{base['all'][2]:.2f} tasks/s")
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
    waited: float  # started_at - created_at: queued for a slot


def conversation(app: RoutedAppliance, conv: int, turns: int, affinity: bool, think: float, tag: str, args,
                 deadline: float, log: list[Turn]) -> None:
    """One user's chat: every turn resends the whole history (a long system prompt of its own first)."""
    rng = random.Random(f"{tag}-{conv}")
    messages = [{"role": "system", "content": f"{tag} {conv} " + words(rng, args.system_words)}]
    session = f"{tag}-conv-{conv}"
    for n in range(turns):
        # the user reads and types (0.5-1.5x `think`); 0: the next turn at once (0-0.3 s, to interleave)
        time.sleep(rng.uniform(0.5, 1.5) * think if think > 0 else rng.uniform(0, 0.3))
        messages.append({"role": "user", "content": words(rng, 10)})
        body = {"type": "chat", "model": ALIAS, "messages": messages, "max_tokens": args.reply_tokens, "seed": n,
                "timeout_s": 600, "session_id": session if affinity else f"{session}-turn-{n}-{uuid.uuid4().hex}"}
        task_id, t0 = app.submit(body)
        rec = app.wait_result(task_id, deadline)
        if rec is None or rec["state"] != "completed":
            raise BenchError(f"part 2: turn {n} of conversation {conv} ({task_id}) "
                             f"{'not final by the bound' if rec is None else rec['state']}:\n"
                             + app.evidence([task_id]))
        res, st = rec["result"], app.status(task_id)
        # (the result omits fields at their default: cached_tokens is absent when nothing came from the cache)
        log.append(Turn(conv, n, res.get("prompt_tokens", 0), res.get("cached_tokens", 0),
                        res["provenance"]["instance"], rec["finished_at"] - t0, st["started_at"] - st["created_at"]))
        messages.append({"role": "assistant", "content": res.get("text", "")})


def part2(args, app: RoutedAppliance, config: str, out: dict, saturated: bool = False) -> None:
    """With and without affinity at the set think time; `saturated`: also with affinity and
    no think time (every conversation always has a turn in flight)."""
    modes = [(True, args.think_s), (False, args.think_s)] + [(True, 0.0)] * saturated
    for affinity, think in modes:
        mode = ("with affinity (a session_id per conversation)" if affinity else
                "without affinity (a unique session_id per turn)") + ("" if think else ", no think time")
        print(f"{at()} part 2 on {app.label}: {mode}", flush=True)
        log: list[Turn] = []
        tag = f"{app.label}-{'aff' if affinity else 'noaff'}-{think:g}"
        deadline = time.time() + args.bound_s + (30 + 1.5 * think) * args.turns
        with cf.ThreadPoolExecutor(args.conversations) as ex:
            for f in [ex.submit(conversation, app, c, args.turns, affinity, think, tag, args, deadline, log)
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
        queued = sum(t.waited > 0.1 for t in log)
        out.setdefault("p2", []).append((config, mode, len(log), repeated, cached_rep, total, cached, moves,
                                         len(log) - len(by_conv), queued, _pct([t.latency * 1000 for t in log], 50),
                                         _pct([t.latency * 1000 for t in log], 95)))


def print_part2(args, out: dict) -> None:
    print(f"\n2. multi-turn chat: {args.conversations} concurrent conversations x {args.turns} turns, system prompt "
          f"{args.system_words} words, replies {args.reply_tokens} tokens, think time {args.think_s:g} s "
          f"(0.5-1.5x) unless said; repeated prefix = the previous turn's "
          f"prompt tokens (turns 2..), cached = llama.cpp's cache_n (capped at the repeated prefix per turn "
          f"in the first pair of columns)")
    print(f"{'appliance':25}{'mode':64}{'turns':>6}{'repeated':>9}{'cached':>8}{'% rep':>7}{'prompt':>8}"
          f"{'cached':>8}{'% all':>7}{'moves':>7}{'queued':>7}{'p50 ms':>8}{'p95 ms':>8}")
    for config, mode, n, rep, crep, total, cached, moves, later, queued, p50, p95 in out.get("p2", []):
        print(f"{config:25}{mode:64}{n:>6}{rep:>9}{crep:>8}{100 * crep / max(1, rep):>7.1f}{total:>8}{cached:>8}"
              f"{100 * cached / max(1, total):>7.1f}{f'{moves}/{later}':>7}{queued:>7}{p50:>8.0f}{p95:>8.0f}")
    print("(moves: later turns that ran on another instance than the conversation's previous turn; queued: turns "
          "that waited > 100 ms for a slot; p50/p95: submit -> final)")


# --------------------------------------------------------------------------- part 3
def part3(args, model: Path, workdir: Path, out: dict) -> None:
    cal = out.get("cal", {"long_s": args.long_tokens / 180, "parallel": 1.4})
    flood = 10 * cal["parallel"] / cal["long_s"]  # 10x the long tasks the machine finishes per second
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
    ap.add_argument("--quick", action="store_true", help="a ~2.5 minute smoke run (short parts, one "
                    "round, no second appliance with the default reservation)")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n-layer", type=int, default=8, help="layers of the generated model (8: ~136 MB)")
    ap.add_argument("--ctx", type=int, default=4096, help="llama.cpp context per instance (split across slots)")
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--long-share", type=float, default=0.2)
    ap.add_argument("--load", type=float, default=0.75, help="offered load as a share of calibrated capacity")
    ap.add_argument("--rate", type=float, default=0.0, help="offered tasks/s instead of --load x the calibrated capacity")
    ap.add_argument("--p1-seconds", type=float, default=15, help="length of the arrival schedule (one replay)")
    ap.add_argument("--rounds", type=int, default=2, choices=(1, 2), help="2: replay ABC then CBA")
    ap.add_argument("--bound-s", type=float, default=120, help="how long after the last arrival a task may take")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-words", type=int, default=80, help="~4.5 tokens per word with this vocabulary")
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--think-s", type=float, default=2.0, help="mean pause between a reply and the next turn")
    ap.add_argument("--p3-seconds", type=float, default=15)
    ap.add_argument("--critical-every-ms", type=int, default=300)
    args = ap.parse_args()
    if args.quick:
        args.p1_seconds, args.rounds, args.p3_seconds = 10, 1, 4
        args.conversations, args.turns = 3, 3
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
            if "1" in args.parts:
                print_part1(args, out)
            if "2" in args.parts:
                print_part2(args, out)
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
