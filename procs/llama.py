"""supervisord program `llama:NAME`: one launcher owning one llama.cpp server.

Usage: python -m procs.llama NAME   (the instance's name in the instances file; the
programs are generated from that file by `appliance up` and `appliance reload`)
"""
import sys

from appliance import logs, metrics
from appliance.config import ConfigError, load_settings

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-0"
    if name.isdigit():  # the former `procs.llama N`
        name = f"llama-{name}"
    logs.setup(name)
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.exit(f"{name}: {exc.code}")
    metrics.use_dir(settings.run_dir)  # before anything imports prometheus_client (appliance/metrics)
    from appliance.llama.launcher import main
    from appliance.llama.server import ServerStartError
    from appliance.worker import Unhealthy

    try:
        main(settings, name)
    except (ServerStartError, Unhealthy) as exc:
        sys.exit(f"{name}: {exc}")
    except ConfigError as exc:
        sys.exit(f"{name}: {exc.code}")
