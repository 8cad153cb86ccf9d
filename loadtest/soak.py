"""Soak test: a steady mixed load against a running appliance for a long time, while
watching every supervised process for memory and file-descriptor growth.

    APPLIANCE_TOKEN=$(.venv/bin/appliance token --sub soak --scopes tasks:read,tasks:write --ttl 2h)
    .venv/bin/python loadtest/soak.py --url http://127.0.0.1:8000 --home . --seconds 1800

Short benchmarks cannot show a leak that costs a few bytes or one descriptor per
request; half an hour of mixed traffic can. The load mixes what clients do:

  async_complete  POST /v1/async/submit (a `complete` task), poll status, fetch result
  async_chat      the same with a `chat` task
  async_stream    submit a `chat` task, follow GET /v1/async/stream/{id} to its
                  `result` event, then fetch the result
  openai_chat     POST /v1/chat/completions
  openai_stream   POST /v1/chat/completions with "stream": true, read to `data: [DONE]`
  rag_search      POST /v1/rag/search (the token then needs rag:read; `make run`
                  indexes an ICD-10-CM sample, so there is something to find)

The processes come from the appliance home's supervisord (`supervisorctl status`)
and their children from /proc (gunicorn workers, an external llama-server), read
without psutil so the appliance gains no dependency. RSS and open descriptors are
measured once after --warmup (the baseline) and once at the end, each time with the
load paused and every client connection closed, so that in-flight requests and
keep-alive sockets do not count as growth. In between, one unpaused sample per
--sample-every seconds goes into the JSON report as a time line.

Exit status 1 when: any request failed (non-2xx, an exception, a stream that ended
without its final event), any task failed or was lost (accepted, never seen final
within --drain-seconds after the load stops), a process restarted (its pid changed)
or vanished, or a process grew by more than --max-growth-pct in RSS or descriptors
(unless --no-growth-check, for short runs where warm-up noise dominates).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import requests

# One concern a module: soak_load (the clients), soak_ops (the operations, the mix),
# soak_procs (the processes), soak_report (the verdicts, the report); this one runs them.
from soak_load import Load, drain
from soak_ops import DEFAULT_MIX, error_code, parse_mix
from soak_procs import Snapshot, proc_order, snapshot
from soak_report import as_sample, build_report, format_report, judge_processes

# re-exported: tests/test_soak.py reaches the pure pieces as soak.*
from soak_load import KINDS  # noqa: F401
from soak_procs import Proc  # noqa: F401
from soak_report import failures, growth_pct, growth_verdict  # noqa: F401

try:  # how many finished records the broker keeps in memory: its RSS grows until they are that many
    from appliance.broker.records import FINISHED_CACHE
except ImportError:  # run from elsewhere than the appliance's venv
    FINISHED_CACHE = 10_000


def measured(load: Load, home: Path, previous: Snapshot, unparked: list[int], last: bool = False) -> Snapshot:
    """A snapshot with every client paused and disconnected; then the load goes on,
    or, for the `last` one, the clients end."""
    unparked.append(load.quiesce(load.args.task_wait + load.args.request_timeout + 5))
    time.sleep(load.args.settle)  # the API workers close the sockets the clients just closed
    snap = snapshot(home, previous)
    if last:
        load.stop.set()
    load.go_on()
    return snap


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the appliance's API")
    ap.add_argument("--token", default=os.environ.get("APPLIANCE_TOKEN", ""),
                    help="bearer token with tasks:read and tasks:write (default: $APPLIANCE_TOKEN)")
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("APPLIANCE_HOME", ".")),
                    help="the appliance home, where supervisord.conf is (default: $APPLIANCE_HOME, else .)")
    ap.add_argument("--seconds", type=float, default=1800, help="length of the load, warm-up included (default 1800)")
    ap.add_argument("--warmup", type=float, default=60, help="seconds of load before the baseline is measured (default 60)")
    ap.add_argument("--clients", type=int, default=4, help="client threads, one HTTP session each (default 4)")
    ap.add_argument("--rate", type=float, default=40,
                    help="operations per second over all clients (default 40; 0: as fast as they can). One "
                         "token is one subject, and the default RATE_LIMITS allow it 100 tasks:write/s: "
                         "beyond that the API answers 429, which counts as an error")
    ap.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                    help=f"operations and their weights (default {DEFAULT_MIX}); rag_search=W adds RAG "
                         "searches (the token needs rag:read)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", help="the model the OpenAI calls name (default: the first of GET /v1/models)")
    ap.add_argument("--max-growth-pct", type=float, default=5.0,
                    help="largest RSS or descriptor growth per process, baseline to end, that passes (default 5)")
    ap.add_argument("--fd-slack", type=int, default=4,
                    help="descriptors a process may gain whatever the %% bound (default 4): each API worker "
                         "pools its broker connections, 2 descriptors each, up to its peak concurrency, which "
                         "the warm-up need not have reached; a leak passes it soon enough")
    ap.add_argument("--no-growth-check", dest="growth_check", action="store_false",
                    help="report growth but do not fail on it (short runs: warm-up noise dominates)")
    ap.add_argument("--poll-interval", type=float, default=0.05, help="seconds between status polls")
    ap.add_argument("--task-wait", type=float, default=60,
                    help="how long a client polls one task before leaving it to the end's drain")
    ap.add_argument("--drain-seconds", type=float, default=120,
                    help="after the load, how long tasks not yet final get before they count as lost")
    ap.add_argument("--request-timeout", type=float, default=30)
    ap.add_argument("--sample-every", type=float, default=60, help="seconds between time-line samples (JSON)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between pausing the clients and measuring")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    if not args.token:
        ap.error("no token: pass --token or set APPLIANCE_TOKEN (`appliance token --sub soak "
                 "--scopes tasks:read,tasks:write --ttl 2h`)")
    if not (args.home / "supervisord.conf").is_file():
        ap.error(f"no supervisord.conf in {args.home} (--home is the appliance home)")
    if args.warmup >= args.seconds:
        ap.error("--warmup must be shorter than --seconds")
    if args.clients < 1:
        ap.error("--clients must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {args.token}"
    try:
        r = s.get(args.url.rstrip("/") + "/v1/models", timeout=10)
    except requests.RequestException as exc:
        print(f"soak: {args.url} does not answer ({type(exc).__name__})", file=sys.stderr)
        return 2
    if r.status_code != 200:
        print(f"soak: GET /v1/models answered {r.status_code} {error_code(r)} (check the token)", file=sys.stderr)
        return 2
    model = args.model or r.json()["data"][0]["id"]
    s.close()

    load = Load(args, model)
    home = args.home.resolve()
    start = snapshot(home)
    t0 = time.time()
    print(f"soak: {args.seconds:.0f} s ({args.warmup:.0f} s warm-up), {args.clients} clients against {args.url}, "
          f"processes: {', '.join(sorted(start.procs, key=proc_order))}", flush=True)
    threads = [threading.Thread(target=load.client, args=(args.seed * 1000 + i,), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    unparked: list[int] = []
    samples = [as_sample(start, t0, "start")]
    baseline, notes = None, []
    warm_at, end_at = t0 + args.warmup, t0 + args.seconds
    next_sample = t0 + args.sample_every
    while (now := time.time()) < end_at:
        if baseline is None and now >= warm_at:
            baseline = measured(load, home, start, unparked)
            samples.append(as_sample(baseline, t0, "baseline"))
            if (warm := load.tasks.accepted) < FINISHED_CACHE:
                rate = warm / max(args.warmup, 1e-9)
                fill = f"~{FINISHED_CACHE / rate:.0f} s at this rate" if rate else "never, at no load"
                notes.append(f"the warm-up ran {warm} tasks; the broker keeps the {FINISHED_CACHE:,} newest "
                             f"finished records in memory, so its RSS grows until that many have run ({fill}): "
                             "a --warmup that long makes its growth figure mean something")
        elif now >= next_sample:
            samples.append(as_sample(snapshot(home), t0, "warm-up" if baseline is None else "load"))
            print(f"soak: {now - t0:.0f} s, {sum(load.stats.count.values())} requests, "
                  f"{sum(sum(c.values()) for c in load.stats.errors.values())} errors", flush=True)
            next_sample += args.sample_every
        else:
            time.sleep(max(0.0, min(end_at, next_sample, warm_at if baseline is None else end_at) - now))
    if baseline is None:  # the warm-up ended as the run did (a snapshot took that long)
        baseline = measured(load, home, start, unparked)
    final = measured(load, home, baseline, unparked, last=True)
    samples.append(as_sample(final, t0, "end"))
    for t in threads:
        t.join(args.task_wait + args.request_timeout + 5)
    seconds = time.time() - t0
    lost = drain(load, args.drain_seconds)
    rows = judge_processes(start, baseline, final, args.max_growth_pct, args.growth_check, args.fd_slack)
    notes += [f"{n} client(s) had not paused when a measurement was taken" for n in unparked if n]
    report = build_report(args, load, lost, rows, seconds, samples, notes)
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
