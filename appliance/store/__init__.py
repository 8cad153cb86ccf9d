"""The broker's durable storage. `open_journal` picks the journal's backend from
DATABASE_URL's scheme, so the broker never names one (journal.py has the contract)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .journal import Journal, SqliteJournal

if TYPE_CHECKING:
    from ..config import Settings

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_journal(settings_or_url: Settings | str | Path) -> Journal:
    """The journal named by Settings.database_url, by a URL (sqlite:///PATH,
    postgresql://...), or by a plain path (an SQLite file); with QUEUE_SCOPE=shared, the
    PostgreSQL journal of the queue several boxes share. psycopg is imported only
    for PostgreSQL: an SQLite appliance does not load it."""
    url = getattr(settings_or_url, "database_url", settings_or_url)
    if getattr(settings_or_url, "queue_scope", "box") == "shared":
        from .shared_queue import SharedJournal

        s = settings_or_url
        return SharedJournal(url, s.box_name, s.lease_s, s.queue_aging_s)
    if isinstance(url, str) and url.startswith(POSTGRES_SCHEMES):
        from .pg_journal import PostgresJournal

        return PostgresJournal(url)
    return SqliteJournal(str(url).removeprefix("sqlite:///"))
