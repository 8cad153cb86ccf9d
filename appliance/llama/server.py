"""The llama.cpp server a launcher owns: embedded (xllamacpp wheel) or an external binary.

Both give the launcher the same thing: an HTTP base URL of a running llama.cpp
server, a way to wait until it is healthy, and a way to stop it. The launcher never
talks to llama.cpp other than over that HTTP API, so the two are interchangeable.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..config import Settings
from ..instances import Instance

log = logging.getLogger("appliance.llama")


class ServerStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1", avoid: frozenset[int] = frozenset()) -> int:
    """A port free now; never one of `avoid` (ports other programs will bind soon)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


class _Base:
    base_url: str

    def health(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=timeout) as r:
                return r.status == 200 and json.loads(r.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.health():
                return
            self.check_alive()
            time.sleep(0.05)
        raise ServerStartError(f"llama.cpp at {self.base_url} not healthy within {timeout_s:.0f}s")

    def check_alive(self) -> None:
        """Raise if the server process is gone (only meaningful for an external binary)."""


def new_api_key(s: Settings, name: str) -> str:
    """A fresh key for one llama.cpp server's life, also left in RUN_DIR (mode 0600).

    llama.cpp has no users: without a key any local process could use the model or
    read /slots, which shows the prompts being processed. With it, only the launcher
    and whoever can read RUN_DIR (the appliance's user: operators, tests, benchmarks)
    get in. /health stays open, as llama.cpp keeps it.
    """
    key = secrets.token_urlsafe(32)
    path = Path(s.run_dir) / f"{name}.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


class EmbeddedServer(_Base):
    """llama.cpp's own server compiled into the xllamacpp wheel, on native threads."""

    def __init__(self, s: Settings, inst: Instance, port: int, api_key: str | None = None):
        import xllamacpp as xlc

        self.api_key = api_key
        p = xlc.CommonParams()
        p.model.path = inst.model_path
        p.hostnames = [s.llama_host]
        p.port = port
        p.n_ctx = inst.ctx
        p.n_parallel = inst.slots
        p.cpuparams.n_threads = inst.threads
        p.cpuparams_batch.n_threads = inst.threads
        p.n_threads_http = max(2, inst.slots + 1)
        p.n_gpu_layers = inst.gpu_layers
        p.embedding = inst.embeddings  # the same instance serves `embed` tasks (mean pooling)
        p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        p.endpoint_slots = True
        p.endpoint_metrics = True
        p.model_alias = {inst.alias}
        p.warmup = False
        p.cache_ram_mib = s.llama_cache_ram_mib
        if api_key:
            p.api_keys = [api_key]
        try:
            self._server = xlc.Server(p)
        except RuntimeError as exc:  # the reason itself went to stderr (our log file)
            raise ServerStartError(f"llama.cpp refused to start on {inst.model_path}: {exc}") from None
        addr = self._server.listening_address
        self.base_url = addr if addr.startswith("http") else f"http://{addr}"

    def stop(self) -> None:
        # Dropping the object stops llama.cpp's loop; it must have answered /health
        # first (stopping a server whose loop never started can hang).
        self._server = None


def _die_with_parent() -> None:
    """Child side of fork: the external server gets SIGTERM if its launcher dies."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ExternalServer(_Base):
    """A `llama-server` binary the operator configured (a CUDA build on a GPU box)."""

    def __init__(self, s: Settings, inst: Instance, port: int, api_key: str | None = None):
        self.api_key = api_key
        cmd = [
            inst.server_bin, "--model", inst.model_path, "--host", s.llama_host, "--port", str(port),
            "--ctx-size", str(inst.ctx), "--parallel", str(inst.slots), "--threads", str(inst.threads),
            "--n-gpu-layers", str(inst.gpu_layers), "--alias", inst.alias, "--slots", "--metrics",
            "--cache-ram", str(s.llama_cache_ram_mib),
            *(["--embeddings", "--pooling", "mean"] if inst.embeddings else []), *inst.extra_args,
        ]
        # Pinned to its GPU; a CPU-only instance sees none (a CUDA build still took 648 MiB
        # of GPU memory with no layers offloaded).
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(inst.gpu) if inst.gpu >= 0 else ""}
        if api_key:  # in the environment (owner-only /proc/PID/environ), not argv (world-readable)
            env["LLAMA_API_KEY"] = api_key
        try:
            self._proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=env)
        except OSError as exc:
            raise ServerStartError(f"cannot run {inst.server_bin}: {exc}") from None
        self.base_url = f"http://{s.llama_host}:{port}"

    def check_alive(self) -> None:
        if self._proc.poll() is not None:
            raise ServerStartError(f"llama-server exited with status {self._proc.returncode}")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def port_for(s: Settings, inst: Instance) -> int:
    """The instance's preferred port when it is free, else a free one (the log says which).

    Never the API's port: every program starts at once, and an instance that took the
    API's port before gunicorn bound it would leave the API unable to start (seen in CI)."""
    avoid = frozenset({s.api_port})
    if inst.port and inst.port not in avoid:
        try:
            with socket.socket() as probe:
                probe.bind((s.llama_host, inst.port))
            return inst.port
        except OSError:
            port = free_port(s.llama_host, avoid)
            log.warning("%s: port %d is taken; listening on %d instead", inst.name, inst.port, port)
            return port
    return free_port(s.llama_host, avoid)


def start_server(s: Settings, inst: Instance, api_key: str | None = None):
    port = port_for(s, inst)
    if inst.engine == "external":
        if not os.access(inst.server_bin, os.X_OK):
            raise ServerStartError(f"{inst.server_bin} (server_bin / LLAMA_SERVER_BIN) is not an executable file")
        server = ExternalServer(s, inst, port, api_key)
    else:
        server = EmbeddedServer(s, inst, port, api_key)
    try:
        server.wait_healthy(s.llama_start_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
