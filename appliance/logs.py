"""Process logging: plain lines on stderr, which supervisord writes to var/log/.

No prompt or result text is ever passed to a logger; log task ids and codes only.
The one exception is LOG_CLINICAL_TEXT=true, an explicit opt-in that each process
announces with a warning when it starts. Exceptions are logged by type and stack
(`exception_summary`), never by message: a message can quote the data it choked on.
"""
from __future__ import annotations

import logging
import os
import traceback


def setup(process: str) -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
    )


def exception_summary(exc: BaseException) -> str:
    """Type and stack frames of an exception, without its message (which may hold text)."""
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    return f"{type(exc).__name__}\n{frames}"
