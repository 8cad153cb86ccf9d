"""supervisord program `api`: the Falcon app under gunicorn (gevent workers).

Why gevent: a request that waits on the broker (an OpenAI call for its whole
answer, an SSE stream for minutes) parks a greenlet, not one of a few threads, so
long requests cannot starve /healthz (tests/test_e2e_lifecycle.py holds 60 streams
open). It also ran the system description's load test ~1.6x faster than gthread
here (README, Performance).
The patch comes first, before any import that could take a lock or a socket.
"""
from gevent import monkey

monkey.patch_all()

from gunicorn.app.base import BaseApplication  # noqa: E402

from appliance import logs, metrics, security  # noqa: E402
from appliance.api.gworker import DrainingGeventWorker  # noqa: E402
from appliance.api.ratelimit import prepare  # noqa: E402
from appliance.config import load_settings  # noqa: E402


class ApiServer(BaseApplication):
    def __init__(self, settings):
        self.settings = settings
        super().__init__()

    def load_config(self):
        s = self.settings
        for key, value in {
            "bind": f"{s.api_host}:{s.api_port}",
            "workers": s.api_workers,
            "worker_class": "appliance.api.gworker.DrainingGeventWorker",
            "worker_connections": s.api_connections,
            "timeout": 60,
            "graceful_timeout": int(s.drain_grace_s) + 10,  # the drain, then open requests finish
            "keepalive": 5,
            "accesslog": None,
            "proc_name": "appliance-api",
            "control_socket_disable": True,
            "child_exit": child_exit,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        from appliance.api.app import create_app  # imports prometheus_client: after metrics.use_dir

        DrainingGeventWorker.settings = self.settings
        return create_app(self.settings)


def child_exit(server, worker) -> None:
    """gunicorn's hook, in the master: a worker's live gauges (requests in flight) go with it."""
    metrics.mark_dead(worker.pid)


if __name__ == "__main__":
    logs.setup("api")
    settings = load_settings()
    metrics.use_dir(settings.run_dir)  # before anything imports prometheus_client (appliance/metrics)
    from appliance.api.app import rate_limit_file

    security.log_warnings(security.check_startup(settings))  # ConfigError: refuse to serve
    prepare(rate_limit_file(settings))  # before the workers fork: one table for all of them
    ApiServer(settings).run()
