"""supervisord program `rag`: the RAG worker (embedder, document store, vector index).

Usage: python -m procs.rag
"""
import sys

from appliance import logs, metrics
from appliance.config import ConfigError, load_settings

if __name__ == "__main__":
    logs.setup("rag")
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.exit(f"rag: {exc.code}")
    metrics.use_dir(settings.run_dir)  # before anything imports prometheus_client (appliance/metrics)
    from appliance.rag.embedder import EmbedderError
    from appliance.rag.handler import main
    from appliance.rag.vectors import IndexMismatch
    from appliance.worker import Unhealthy

    try:
        main(settings)
    except (EmbedderError, IndexMismatch, Unhealthy) as exc:
        sys.exit(f"rag: {exc}")
