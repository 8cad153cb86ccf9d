"""`make run` on a fresh checkout, with nothing but what it installs itself.

Why: the test command installs the test extras into the same .venv, and once they hid
a runtime dependency that `make run` lacked (gunicorn's gevent worker imports
`packaging`; pytest brought it in): every test passed while `make run` left the API
FATAL. Here the checkout's files (what a clone holds) are copied to a temporary
directory and the README's run command is run there, literally: its own virtual
environment, its own `appliance init`, every supervised program, then one chat task
through the API. pip's cache makes the install cheap after the first one.
"""
from __future__ import annotations

import shutil
import subprocess

import requests

from conftest import ROOT, Appliance, appliance_env, wait_until


def fresh_checkout(dest):
    """The files a clone of this working tree would hold (tracked, and new files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_make_run_alone_installs_enough_to_serve_a_task(tmp_path):
    home = fresh_checkout(tmp_path / "appliance")
    env = appliance_env(home)
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME",  # nothing of the test environment leaks in
                "LLAMA_INSTANCES"):                       # and the default instances, as a user gets them
        env.pop(key, None)
    app = Appliance(home, env, bin_dir=home / ".venv" / "bin", command=["make", "run"])
    app.start()
    try:
        app.wait_ready(timeout=400)  # the install comes first
        python = str(home / ".venv" / "bin" / "python")
        # the run command's environment holds no test extras (they once hid a missing dependency)
        assert subprocess.run([python, "-c", "import pytest"], capture_output=True).returncode != 0
        states = wait_until(lambda: (out := app.ctl("status").stdout).count("RUNNING") >= 6 and out, 60, 0.5,
                            "every program RUNNING")
        assert "FATAL" not in states and "BACKOFF" not in states, states
        for name in ("llama:llama-0", "llama:llama-1", "llama:llama-2"):  # the system description's three
            assert name in states
        token = subprocess.run([str(app.bin / "appliance"), "token", "--sub", "first-user",
                                "--scopes", "tasks:read,tasks:write", "--ttl", "10m"],
                               cwd=home, env=env, capture_output=True, text=True, check=True).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        r = requests.post(app.url + "/v1/async/submit", headers=auth, timeout=10, json={
            "type": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert r.status_code == 202, r.text

        def result():
            got = requests.get(app.url + f"/v1/async/result/{r.json()['task_id']}", headers=auth, timeout=10)
            return got.json() if got.status_code == 200 else None
        body = wait_until(result, 60, 0.1, "the chat's result")
        assert body["state"] == "completed" and body["result"]["text"], body
    except BaseException:
        print((home / "appliance-up.out").read_text()[-5000:], app.logs())
        raise
    finally:
        app.stop()  # and nothing may outlive supervisord: stop() asserts it
    assert (home / ".env").stat().st_mode & 0o777 == 0o600  # `make run` wrote it, private
