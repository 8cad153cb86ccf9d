"""Which models the broker knows: those of the instances file, and any a worker serves.

Re-read when the file changes (`appliance reload` edits it), so that a new model is
accepted at once and one no instance is configured for is refused with
model_not_found. A broken edit is logged and the last good list kept: the queue
must not stop for a typo.
"""
from __future__ import annotations

import logging

from .. import instances
from .. import protocol as P
from ..config import Settings

log = logging.getLogger("appliance.broker")


class ModelCatalog:
    def __init__(self, settings: Settings):
        self.s = settings
        self.models: list[str] = []         # the file's models, the default first
        self._seen: float | None = None     # the file's mtime when last read
        self.refresh()

    def refresh(self) -> None:
        path = instances.instances_path(self.s)
        mtime = path.stat().st_mtime if path.is_file() else None
        if self.models and mtime == self._seen:
            return
        try:
            configured = instances.models(instances.load(self.s))
        except SystemExit as exc:  # ConfigError
            log.error("instances file not (re)read: %s", exc.code)
            return
        self._seen = mtime
        if configured != self.models[:len(configured)] or not self.models:
            log.info("configured models: %s", ", ".join(configured))
        served = [m for m in self.models if m not in configured]  # learnt from workers: kept
        self.models = configured + served

    def note(self, model: str) -> None:
        """A worker serves it: it is known from now on."""
        if model not in self.models and model != P.RAG_SERVICE:
            self.models.append(model)

    def default(self) -> str:
        return self.s.default_model or (self.models[0] if self.models else instances.TINY_ALIAS)
