"""Journal throughput with group commit, SQLite against PostgreSQL; prints one table.

    .venv/bin/python loadtest/bench_journal.py                  # a throwaway PostgreSQL
    .venv/bin/python loadtest/bench_journal.py --database-url postgresql://u:p@host/scratch
    .venv/bin/python loadtest/bench_journal.py --broker-n 20000  # and the whole broker, both journals

Why: the broker acknowledges a submit only after the commit of its loop iteration, so
a commit's cost bounds the broker's rate at each batch size (one submit at a time:
batches of 1; a loaded broker: hundreds). A task costs the journal two writes: its
insert (record and spec) and its completion (record and result), each row here.

Batches of 1, 64 and 512 tasks, each batch one `commit()`, as the broker does it.
SQLite journals in a temporary directory (synchronous=FULL: one fsync per commit);
PostgreSQL in a fresh database of a throwaway server (tests/support/postgres.py,
fsync on, synchronous_commit on), or in --database-url's scratch database (its journal
tables are dropped first). --broker-n runs bench_broker.py's part 2 (no-op tasks
through the real broker process) on each journal as well.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from msgspec.structs import replace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from appliance import protocol as P  # noqa: E402
from appliance.store import open_journal  # noqa: E402

SPEC = P.ChatTask(messages=[P.ChatMessage("user", "Summarise the discharge note. " * 4)], max_tokens=128)
RESULT = P.TaskResult(text="The patient was discharged in good condition. " * 4, prompt_tokens=40,
                      completion_tokens=40)
BATCHES = (1, 64, 512)


def measure(url: str, batch: int, n: int) -> tuple[float, float]:
    """tasks/s of (inserts, completions) in commits of `batch` tasks."""
    journal = open_journal(url)
    try:
        recs = [P.TaskRecord(task_id=f"{i:032x}", state="queued", type="chat", priority="normal",
                             created_at=time.time()) for i in range(1, n + 1)]
        rates = []
        for phase in ("insert", "complete"):
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                for seq in range(start + 1, min(start + batch, n) + 1):
                    rec = recs[seq - 1]
                    if phase == "insert":
                        journal.write(seq, rec, SPEC)
                    else:
                        journal.write(seq, replace(rec, state="completed", finished_at=time.time(), result=RESULT))
                journal.commit()
            rates.append(n / (time.perf_counter() - t0))
        return rates[0], rates[1]
    finally:
        journal.close()


@contextlib.contextmanager
def postgres_databases(url: str | None):
    """A function giving a fresh, empty PostgreSQL database URL per call."""
    if url:
        import psycopg

        def scratch() -> str:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS tasks, schema_version")
            return url
        yield scratch, "given server"
        return
    from support.postgres import throwaway_postgres

    with throwaway_postgres() as pg:
        yield pg.new_database, f"throwaway PostgreSQL, started in {pg.startup_s:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="tasks per run at batch sizes above 1")
    ap.add_argument("--n1", type=int, default=1_000, help="tasks per run at batch size 1 (one fsync each)")
    ap.add_argument("--database-url", default="", help="a PostgreSQL scratch database (its journal tables are dropped)")
    ap.add_argument("--broker-n", type=int, default=0, help="also run bench_broker.py part 2 with this many tasks")
    args = ap.parse_args()
    import psycopg

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, psycopg {psycopg.__version__}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp, \
            postgres_databases(args.database_url) as (fresh_pg, pg_said):
        print(f"postgres: {pg_said}")
        for batch in BATCHES:
            n = args.n1 if batch == 1 else args.n
            for name, url in (("sqlite", f"sqlite:///{tmp}/journal-{batch}.sqlite3"), ("postgres", fresh_pg())):
                ins, done = measure(url, batch, n)
                rows.append([name, f"{batch}", f"{n}", f"{ins:,.0f}", f"{done:,.0f}"])
        print_table(rows)
        if args.broker_n:
            pg_url = fresh_pg()
            for extra in ([], ["--database-url", pg_url]):
                subprocess.run([sys.executable, str(ROOT / "loadtest" / "bench_broker.py"), "--parts", "2",
                                "--n", str(args.broker_n), *extra], check=True)


def print_table(rows: list[list[str]]) -> None:
    header = ["journal", "batch", "tasks", "inserts tasks/s", "completions tasks/s"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("\njournal write+commit, one commit per batch")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(f"{c:>{w}}" for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
