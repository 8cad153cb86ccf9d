"""Process logging: plain lines on stderr, which supervisord writes to var/log/.

No prompt or result text is ever passed to a logger; log task ids and codes only.
"""
from __future__ import annotations

import logging
import os


def setup(process: str) -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
    )
