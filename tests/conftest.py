"""Fixtures that start real parts: the tiny GGUF, llama.cpp, the whole appliance."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from appliance.llama.server import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from appliance.llama.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


USER_SCOPES = ("tasks:read", "tasks:write")


class Appliance:
    """The real appliance under the repo's own supervisord.conf, in a temporary home.

    `get`/`post` send the bearer token of tenant `tester` (tasks:read, tasks:write)
    unless the caller passes its own Authorization header (None sends none).
    """

    def __init__(self, home: Path, env: dict[str, str], bin_dir: Path = BIN, command: list[str] | None = None):
        self.home = home
        self.env = env
        self.bin = bin_dir
        self.command = command or [str(bin_dir / "appliance"), "up"]
        self.port = int(env["API_PORT"])
        self.url = f"http://{env.get('API_HOST', '127.0.0.1')}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._settings = None

    @functools.cached_property
    def token(self) -> str:
        return self.mint("tester", *USER_SCOPES)

    def settings(self):
        """The appliance's settings (its env and .env do not change once it is made)."""
        if self._settings is None:
            from appliance.config import load_settings

            self._settings = load_settings(self.env)
        return self._settings

    def mint(self, sub: str, *scopes: str, ttl_s: int = 3600) -> str:
        from appliance.security import mint_token

        return mint_token(self.settings(), sub, list(scopes), ttl_s)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def _headers(self, kw: dict) -> dict:
        headers = kw.get("headers") or {}
        if "Authorization" not in headers and self.settings().jwt_secret_key:
            headers = {**self.auth(), **headers}
        kw["headers"] = headers
        return kw

    def start(self) -> None:
        self.log = open(self.home / "appliance-up.out", "wb")
        self.proc = subprocess.Popen(
            self.command, cwd=self.home, env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def ctl(self, *words: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / "supervisorctl"), "-c", str(self.home / "supervisord.conf"), *words],
            capture_output=True, text=True, timeout=60, env=self.env,
        )

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 10)
        return requests.get(self.url + path, **self._headers(kw))

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 10)
        return requests.post(self.url + path, **self._headers(kw))

    def request(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, self.url + path, timeout=10, **self._headers(kw))

    def wait_ready(self, timeout: float = 90) -> None:
        """/readyz answers 200; fails at once if supervisord (the command) has exited."""
        supervisord_log = self.home / "var" / "log" / "supervisord.log"

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisord exited: {self.logs()}")
            if supervisord_log.exists() and "entered FATAL state" in supervisord_log.read_text(errors="replace"):
                raise AssertionError(f"a program went FATAL: {self.logs()}")
            try:
                return self.get("/readyz").status_code == 200
            except requests.ConnectionError:
                return False
        wait_until(ready, timeout, 0.2, "/readyz 200")

    def logs(self) -> str:
        out = []
        for f in sorted((self.home / "var" / "log").glob("*.log")):
            out.append(f"== {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def pids(self) -> list[int]:
        """Pids of every live process in supervisord's session (itself and all children);
        zombies (killed, not yet reaped) are not processes that outlived anything."""
        out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
        return [int(p) for p, sid, stat in (line.split() for line in out.splitlines())
                if int(sid) == self.proc.pid and not stat.startswith("Z")]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.ctl("shutdown")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(10)
        leftover = self.pids()
        for pid in leftover:  # nothing may outlive the test run, even on failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        assert not leftover, f"processes outlived supervisord: {leftover}"


def make_home(tmp: Path) -> Path:
    """A home as `appliance init` leaves it: supervisord.conf and a .env with fresh secrets."""
    from appliance.security import init_env

    shutil.copy(ROOT / "supervisord.conf", tmp / "supervisord.conf")
    init_env(tmp)
    return tmp


def appliance_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("API_", "LLAMA_", "MODEL_", "BROKER_", "JWT_", "AUDIT_", "RATE_", "ALLOW_",
                                "INSTANCES_", "DEFAULT_MODEL", "CRITICAL_", "GPU_", "AFFINITY_"))}
    env.update({
        "APPLIANCE_HOME": str(home),
        "API_PORT": str(free_port()),
        "API_WORKERS": "2",
        "LLAMA_INSTANCES": "1",  # the default is three; tests that need more say so
        "GPUMON_INTERVAL_S": "0.5",
    })
    env.update(extra)
    return env


@contextlib.contextmanager
def running_appliance(tmp_path_factory, **env: str):
    """A ready appliance in a fresh home; its logs are printed if the block fails."""
    home = make_home(tmp_path_factory.mktemp("home"))
    app = Appliance(home, appliance_env(home, **env))
    app.start()
    try:
        app.wait_ready()
        yield app
    except BaseException:
        print(app.logs())
        raise
    finally:
        app.stop()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    """The appliance on its embedded default: no MODEL_PATH, so it makes its tiny model."""
    with running_appliance(tmp_path_factory) as app:
        yield app


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a running appliance gets its programs' logs in the report:
    a CI failure then says what the broker, the API and the launchers saw."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for value in item.funcargs.values():
            for app in value if isinstance(value, (list, tuple)) else (value,):  # `boxes` is a list
                if isinstance(app, Appliance):
                    rep.sections.append((f"appliance logs ({app.home})", app.logs()))
