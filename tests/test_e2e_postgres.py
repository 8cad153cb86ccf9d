"""The broker and the whole appliance on a PostgreSQL journal.

The appliance: a task submitted over HTTP completes, the broker is restarted, and the
result is still there (read back from PostgreSQL: a restarted broker has nothing in
memory). The URL carries a password, which must appear in no log. The broker alone
(in a thread, as test_broker.py runs it): PostgreSQL stopped under it, as a full disk
is stopped under SQLite in test_storage_faults.py.
"""
from __future__ import annotations

import logging

from appliance import protocol as P
from appliance.config import load_settings
from appliance.store import open_journal
from conftest import running_appliance, wait_until
from support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from test_broker import SPEC, Running, query, submit

SECRET = "e2e-Pa55word-never-logged"


def test_a_result_survives_a_broker_restart_on_postgres(tmp_path_factory, postgres_server, postgres_url):
    url = postgres_url.replace("postgres@", f"postgres:{SECRET}@")  # trust auth: accepted, unused
    with running_appliance(tmp_path_factory, DATABASE_URL=url) as app:
        task_id = app.post("/v1/async/submit", json={"type": "complete", "prompt": "the patient",
                                                      "max_tokens": 4}).json()["task_id"]
        wait_until(lambda: app.get(f"/v1/async/status/{task_id}").json()["state"] == "completed", 30,
                   what="the task completed")
        before = app.get(f"/v1/async/result/{task_id}").json()
        db = postgres_url.rsplit("/", 1)[1]
        assert postgres_server.sql(f"SELECT state FROM tasks WHERE task_id='{task_id}'", db) == [("completed",)]

        out = app.ctl("restart", "broker")
        assert out.returncode == 0, out.stdout + out.stderr
        app.wait_ready()
        after = app.get(f"/v1/async/result/{task_id}")
        assert after.status_code == 200 and after.json() == before and before["result"]["text"] is not None
        logs = app.logs() + (app.home / "appliance-up.out").read_text(errors="replace")
        assert SECRET not in logs


def test_the_broker_refuses_while_postgres_is_down_and_recovers_by_itself(tmp_path, postgres_server,
                                                                           postgres_url, caplog):
    """Server stopped: submits refused storage_unavailable; the result of a task accepted
    before arrives meanwhile and is written once the server is back, with no restart."""
    caplog.set_level(logging.INFO, logger="appliance")
    settings = load_settings({"APPLIANCE_HOME": str(tmp_path), "DATABASE_URL": postgres_url,
                              "QUEUE_MAX_SIZE": "100", "QUEUE_AGING_S": "0", "WORKER_LIVENESS_S": "5"})
    broker = Running(settings)
    try:
        c = broker.client()
        before = submit(c, 1)
        w = broker.worker("w1", slots=1)
        assert w.recv_not(P.Heartbeat).task_id == before

        postgres_server.stop()
        try:
            c.send(P.Submit(2, SPEC))
            reply = c.recv()
            assert isinstance(reply, P.Refused) and reply.code == "storage_unavailable", reply
            # a task the broker no longer holds is read from the journal: refused at once, not dropped
            c.send(P.Query(4, "0" * 32))
            reply = c.recv()
            assert isinstance(reply, P.Refused) and reply.code == "storage_unavailable", reply
            w.send(P.Done(before, result=P.TaskResult(text="kept")))
            wait_until(lambda: query(c, before).state == "completed", 3, what="completed in memory")
            told = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
            assert len(told) == 1 and "Connection refused" in told[0], told
        finally:
            postgres_server.start()
        after = submit(c, 3)  # the next commit reconnects: no restart
        assert any("writable again" in r.getMessage() for r in caplog.records)
        journal = open_journal(postgres_url)
        try:
            assert journal.get(before).result.text == "kept" and journal.get(after).state == "queued"
        finally:
            journal.close()
    finally:
        broker.stop()
