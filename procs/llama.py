"""supervisord program `llama:NAME`: one launcher owning one llama.cpp server.

Usage: python -m procs.llama NAME   (the instance's name in the instances file; the
programs are generated from that file by `appliance up` and `appliance reload`)
"""
import sys

from appliance import logs
from appliance.config import ConfigError, load_settings
from appliance.llama.launcher import main
from appliance.llama.server import ServerStartError
from appliance.worker import Unhealthy

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-0"
    if name.isdigit():  # the former `procs.llama N`
        name = f"llama-{name}"
    logs.setup(name)
    try:
        main(load_settings(), name)
    except (ServerStartError, Unhealthy) as exc:
        sys.exit(f"{name}: {exc}")
    except ConfigError as exc:
        sys.exit(f"{name}: {exc.code}")
