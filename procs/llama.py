"""supervisord program `llama-N`: one launcher owning one llama.cpp server.

Usage: python -m procs.llama INDEX   (supervisord passes %(process_num)d)
"""
import sys

from appliance import logs
from appliance.config import load_settings
from appliance.llama.launcher import main
from appliance.llama.server import ServerStartError
from appliance.worker import Unhealthy

if __name__ == "__main__":
    index = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    logs.setup(f"llama-{index}")
    try:
        main(load_settings(), index)
    except (ServerStartError, Unhealthy) as exc:
        sys.exit(f"llama-{index}: {exc}")
