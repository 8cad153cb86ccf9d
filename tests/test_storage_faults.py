"""Storage faults, on real filesystems: a journal that cannot be written (disk full,
read-only) and a journal that is damaged at start.

The faults are real ones, not mocks: the journal lives on a small tmpfs (or a loop-
mounted ext4) that the test mounts, fills until ENOSPC, frees again, or makes fail.
Mounting needs root. These tests fail (never skip) without it, so that a CI job that
lost root cannot go green without them; CI and the development machine run as root.
(Running them in `unshare --user --map-root-user --mount` was the alternative; it would
have to wrap the whole pytest process, since the broker runs in a thread of it, and
supervisord's children too, which is more machinery than requiring root.)
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from msgspec.structs import replace

from appliance import protocol as P
from appliance.config import load_settings
from appliance.store.journal import JournalDamaged, SqliteJournal
from conftest import ROOT, appliance_env, make_home, running_appliance, wait_until
from test_broker import SPEC, Running, query, stats, submit

ROOT_NEEDED = ("this test mounts a filesystem (tmpfs, loop ext4) to make real storage faults: "
               "run it as root (CI does), e.g. `sudo .venv/bin/python -m pytest tests/test_storage_faults.py`")


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(ROOT_NEEDED, pytrace=False)


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr.strip()}"


def _unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)  # never leave it mounted


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs: the journal of a few dozen tasks fits; a filler file takes the rest."""
    _need_root()
    where = tmp_path / "fs"
    where.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where))
    try:
        yield where
    finally:
        _unmount(where)


def fill(where: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC: page-sized writes, so that
    not even a page is left."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"\0" * 4096
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def journal_settings(home: Path, journal: Path):
    return load_settings({"APPLIANCE_HOME": str(home), "DATABASE_URL": f"sqlite:///{journal}",
                          "QUEUE_MAX_SIZE": "100", "QUEUE_AGING_S": "0", "WORKER_LIVENESS_S": "5"})


def submit_until_refused(client, first_req: int, tries: int = 50) -> tuple[list[str], P.Refused]:
    """Submit until one is refused. A few may still be accepted once the disk is full
    (SQLite can reuse room in its WAL file): those are journaled, and must complete."""
    accepted = []
    for req in range(first_req, first_req + tries):
        client.send(P.Submit(req, SPEC))
        reply = client.recv()
        assert reply is not None and reply.req == req, reply
        if isinstance(reply, P.Refused):
            return accepted, reply
        accepted.append(reply.task_id)
    pytest.fail(f"{tries} submits accepted on a full filesystem")


def on_disk(journal: Path, task_id: str) -> P.TaskRecord | None:
    """The task as the journal file holds it (another connection: what a restart would see)."""
    other = SqliteJournal(journal)
    try:
        return other.get(task_id)
    finally:
        other.close()


def run_all(client, worker, ids: list[str]) -> None:
    """The worker (one slot) completes every task it is given until all of `ids` are final."""
    left = set(ids)
    deadline = time.monotonic() + 15
    while left and time.monotonic() < deadline:
        msg = worker.recv_not(P.Heartbeat, timeout=0.5)
        if isinstance(msg, P.Dispatch):
            worker.send(P.Done(msg.task_id, result=P.TaskResult(text=f"done {msg.task_id}")))
            worker.send(P.Credit(1))
            left.discard(msg.task_id)
    assert not left, f"never dispatched: {left}"
    for task_id in ids:
        wait_until(lambda: query(client, task_id).state == "completed", 3, what=f"{task_id} completed")


# ------------------------------------------------------------------ the journal alone
def test_failed_commit_drops_inserts_keeps_updates(tmpfs):
    """The unit rule: a commit that fails drops the new tasks (their submits are refused)
    and keeps the state changes of acknowledged ones, coalesced, until a commit succeeds."""
    path = tmpfs / "journal.sqlite3"
    journal = SqliteJournal(path)
    old = P.TaskRecord(task_id="a" * 32, state="queued", type="complete", priority="normal", created_at=1.0)
    journal.write(1, old, SPEC)
    journal.commit()

    filler = fill(tmpfs)
    journal.write(1, replace(old, state="running"))
    journal.write(1, replace(old, state="completed", finished_at=2.0, result=P.TaskResult(text="kept")))
    new = P.TaskRecord(task_id="b" * 32, state="queued", type="complete", priority="normal", created_at=1.5)
    journal.write(2, new, SPEC)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        journal.commit()
    assert journal.pending  # the updates wait
    assert on_disk(path, old.task_id).state == "queued"

    filler.unlink()
    journal.commit()
    rec = on_disk(path, old.task_id)
    assert rec.state == "completed" and rec.result.text == "kept"  # the latest update won
    assert on_disk(path, new.task_id) is None  # a refused insert is gone for good
    assert not journal.pending
    journal.close()


# ------------------------------------------------------------------ the broker, disk full
def test_full_disk_refuses_submits_keeps_updates_and_recovers(tmpfs, tmp_path, caplog):
    """Disk full: submits are refused storage_unavailable and forgotten; a task accepted
    before whose result arrives during the fault ends completed, result journaled, once
    space returns; the same broker then accepts again. One log line per episode."""
    caplog.set_level(logging.INFO, logger="appliance")
    journal = tmpfs / "journal.sqlite3"
    broker = Running(journal_settings(tmp_path, journal))
    try:
        c = broker.client()
        before = submit(c, 1)
        waiting = submit(c, 2)
        w = broker.worker("w1", slots=1)
        assert w.recv_not(P.Heartbeat).task_id == before

        filler = fill(tmpfs)
        accepted, refused = submit_until_refused(c, 10)
        assert refused.code == "storage_unavailable"
        proposed = uuid.uuid4().hex
        c.send(P.Submit(90, SPEC, task_id=proposed))
        reply = c.recv()
        assert isinstance(reply, P.Refused) and reply.code == "storage_unavailable"
        c.send(P.Query(91, proposed))
        assert c.recv().code == "not_found"  # forgotten: never acknowledged, never queued

        # The result of a task accepted before the fault arrives during it.
        w.send(P.Done(before, result=P.TaskResult(text="kept")))
        wait_until(lambda: query(c, before).state == "completed", 3, what="completed in memory")
        assert query(c, before).result.text == "kept"
        time.sleep(0.3)  # the loop retries the update (and fails) meanwhile
        assert on_disk(journal, before).state == "queued"  # not written yet: kept in memory
        errors = stats(c).journal_errors
        assert errors >= 3
        told = [r for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(told) == 1, [r.getMessage() for r in told]  # once per episode

        filler.unlink()
        after = submit(c, 100)  # the next commit succeeds: no restart
        rec = on_disk(journal, before)
        assert rec.state == "completed" and rec.result.text == "kept"
        back = [r.getMessage() for r in caplog.records if "writable again" in r.getMessage()]
        assert len(back) == 1 and back[0].startswith("journal writable again after 2 refused submits"), back

        w.send(P.Credit(1))
        run_all(c, w, [waiting, *accepted, after])
        for task_id in [before, waiting, *accepted, after]:
            assert on_disk(journal, task_id).state == "completed"
    finally:
        broker.stop()


# ------------------------------------------------------------------ the broker, read-only
@pytest.fixture
def ext4(tmp_path):
    """A loop-mounted ext4 with errors=remount-ro, the way a real disk goes read-only.

    `mount -o remount,ro` cannot do it: Linux refuses (EBUSY) while a file on the
    filesystem is open for writing, as the journal always is. A filesystem error can,
    and /sys/fs/ext4/DEV/trigger_fs_error makes one: the kernel then makes the mount
    read-only (since 6.4 it is shut down for writes, reads still work) until it is
    unmounted; a remount rw is refused too, so this one comes back by a restart."""
    _need_root()
    image, where = tmp_path / "ext4.img", tmp_path / "ext4"
    where.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    _run("mkfs.ext4", "-q", str(image))
    _run("mount", "-o", "loop,errors=remount-ro", str(image), str(where))
    try:
        yield image, where
    finally:
        _unmount(where)


def test_read_only_filesystem_refuses_submits_and_a_restart_recovers(ext4, tmp_path):
    """The filesystem goes read-only under a running broker: submits are refused
    storage_unavailable and reads still answered. Such a filesystem only comes back by
    an unmount, hence a restart: every task acknowledged before is then still there."""
    image, where = ext4
    journal = where / "journal.sqlite3"
    settings = journal_settings(tmp_path, journal)
    broker = Running(settings)
    try:
        c = broker.client()
        running = submit(c, 1)
        queued = submit(c, 2)
        w = broker.worker("w1", slots=1)
        assert w.recv_not(P.Heartbeat).task_id == running

        device = subprocess.run(["findmnt", "-no", "SOURCE", str(where)], capture_output=True,
                                text=True).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("storage fault test\n")
        c.send(P.Submit(3, SPEC))
        reply = c.recv()
        assert isinstance(reply, P.Refused) and reply.code == "storage_unavailable", reply
        assert query(c, queued).state == "queued"  # reads still work
        assert stats(c).journal_errors >= 1
    finally:
        broker.stop()

    _unmount(where)  # what an operator does: unmount, check, mount again, restart
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)
    _run("mount", "-o", "loop", str(image), str(where))
    again = Running(settings)
    try:
        c = again.client()
        w = again.worker("w2", slots=1)
        run_all(c, w, [running, queued])  # both acknowledged: both run
        assert stats(c).journal_errors == 0
    finally:
        again.stop()


# ------------------------------------------------------------------ the whole appliance
def test_appliance_answers_503_while_the_disk_is_full_and_recovers_without_restart(tmpfs, tmp_path_factory):
    """Through HTTP: 503 storage_unavailable with Retry-After while the journal's disk
    is full, 202 and a completed task once it has room, from the same broker process."""
    journal = tmpfs / "journal.sqlite3"
    task = {"type": "complete", "prompt": "The plan is", "max_tokens": 4}
    with running_appliance(tmp_path_factory, DATABASE_URL=f"sqlite:///{journal}") as app:
        pid = app.ctl("pid", "broker").stdout.strip()
        assert pid.isdigit(), pid
        filler = fill(tmpfs)
        for _ in range(50):  # a few may fit in the WAL's room: those are journaled
            r = app.post("/v1/async/submit", json=task)
            if r.status_code != 202:
                break
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "storage_unavailable"
        assert int(r.headers["Retry-After"]) >= 1

        filler.unlink()
        r = app.post("/v1/async/submit", json=task)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]

        def final():
            r = app.get(f"/v1/async/result/{task_id}")
            return r.json() if r.status_code == 200 else None
        assert wait_until(final, 30, 0.05, "the task to finish")["state"] == "completed"
        assert app.ctl("pid", "broker").stdout.strip() == pid  # recovered by itself
        assert "journal writable again" in (app.home / "var" / "log" / "broker.log").read_text()


# ------------------------------------------------------------------ damaged at start
@pytest.fixture(scope="module")
def full_journal(tmp_path_factory) -> Path:
    """A journal of 3,000 finished tasks (about 2.7 MB), written by the journal itself."""
    path = tmp_path_factory.mktemp("journal") / "journal.sqlite3"
    journal = SqliteJournal(path)
    now = time.time()
    for seq in range(1, 3001):
        rec = P.TaskRecord(task_id=uuid.uuid4().hex, state="queued", type="complete", priority="normal",
                           created_at=now)
        journal.write(seq, rec, P.CompleteTask(prompt="lorem ipsum dolor sit amet " * 8, max_tokens=64))
        rec.state, rec.finished_at, rec.result = "completed", now, P.TaskResult(text="generated text " * 15)
        journal.write(seq, rec)
    journal.commit()
    journal.close()  # the last connection checkpoints: everything is in the main file
    assert not Path(f"{path}-wal").exists()
    return path


def damage(src: Path, dst: Path, how: str) -> Path:
    shutil.copy(src, dst)
    size = dst.stat().st_size
    if how == "truncated":
        os.truncate(dst, size // 2)
    elif how == "garbage":
        with open(dst, "r+b") as f:  # random bytes over three pages in the middle
            f.seek(size // 2 + 100)
            f.write(os.urandom(3 * 4096))
    else:  # "not a database": its header too
        with open(dst, "r+b") as f:
            f.write(os.urandom(8192))
    return dst


@pytest.mark.parametrize("how", ["truncated", "garbage", "header"])
def test_damaged_journal_is_refused_not_half_loaded(full_journal, tmp_path, how):
    """Truncated, garbage in its pages, or not a database at all: refused at open with
    one line naming the file, what SQLite said and what to do; the file is left as it was."""
    path = damage(full_journal, tmp_path / "journal.sqlite3", how)
    before = path.read_bytes()
    with pytest.raises(JournalDamaged) as caught:
        SqliteJournal(path)
    message = str(caught.value)
    assert str(path) in message and "damaged (SQLite: " in message
    assert "move it aside" in message and "backup" in message and "\n" not in message
    assert path.read_bytes() == before  # refused, not repaired or written to


def test_broker_process_exits_with_one_clear_line_on_a_damaged_journal(full_journal, tmp_path):
    """What the operator sees in var/log/broker.log: one line, no traceback, status 2."""
    home = make_home(tmp_path)
    path = home / "var" / "data" / "journal.sqlite3"
    path.parent.mkdir(parents=True)
    damage(full_journal, path, "truncated")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "procs.broker"], cwd=ROOT, env=appliance_env(home),
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 10
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and f"journal {path} is damaged" in lines[0] and "CRITICAL" in lines[0], lines
