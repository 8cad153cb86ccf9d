"""supervisord program `broker`: the priority broker (appliance.broker.server).

A journal that cannot be used at start (damaged, truncated, unreadable, a newer schema)
ends the process with one line that says what to do, and a non-zero status: a stack
trace would bury that line, and a broker must not run on half a journal.
"""
import logging
import sqlite3
import sys

from appliance import logs, metrics
from appliance.config import load_settings
from appliance.store.journal import JournalError, describe

if __name__ == "__main__":
    logs.setup("broker")
    log = logging.getLogger("appliance.broker")
    settings = load_settings()
    metrics.use_dir(settings.run_dir)  # before anything imports prometheus_client (appliance/metrics)
    from appliance.broker.server import main

    try:
        main(settings)
    except JournalError as exc:
        log.critical("%s", exc)
        sys.exit(2)
    except (sqlite3.Error, OSError) as exc:  # at start (recovery) or at the last commit of a stop; a
        # PostgreSQL failure is an OSError (store/pg_journal.py, PostgresFailure)
        log.critical("journal %s could not be written (%s); state changes not yet journaled are lost: "
                     "their tasks come back from the journal at the next start", settings.journal_path,
                     describe(exc))
        sys.exit(1)
