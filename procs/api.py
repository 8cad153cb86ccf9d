"""supervisord program `api`: the Falcon app under gunicorn (gthread workers)."""
from gunicorn.app.base import BaseApplication

from appliance import logs, security
from appliance.api.app import create_app, rate_limit_file
from appliance.api.ratelimit import prepare
from appliance.config import load_settings


class ApiServer(BaseApplication):
    def __init__(self, settings):
        self.settings = settings
        super().__init__()

    def load_config(self):
        s = self.settings
        for key, value in {
            "bind": f"{s.api_host}:{s.api_port}",
            "workers": s.api_workers,
            "worker_class": "gthread",
            "threads": s.api_threads,
            "timeout": 60,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "proc_name": "appliance-api",
            "control_socket_disable": True,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)


if __name__ == "__main__":
    logs.setup("api")
    settings = load_settings()
    security.log_warnings(security.check_startup(settings))  # ConfigError: refuse to serve
    prepare(rate_limit_file(settings))  # before the workers fork: one table for all of them
    ApiServer(settings).run()
