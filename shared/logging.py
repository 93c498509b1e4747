"""structlog configuration: JSON lines (or a console renderer on a terminal) with trace ids.

Standard-library loggers (grpc, sqlalchemy, alembic, ray) are routed through the same processors so that
every line a service writes has one shape. Lines go to stderr, or to a file (always JSON there) that is
rotated at a size cap, so that a service left running never fills its disk.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

import structlog
from opentelemetry import trace


def add_trace_ids(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Add the current OpenTelemetry span's ids, so logs and traces join."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


#: Older files a rotated log file keeps beside the current one (``service.log.1`` … ``.3``).
LOG_FILE_BACKUPS = 3


def configure_logging(
    service: str, level: str = "info", fmt: str = "auto", file: Path | None = None, max_bytes: int = 16 * 2**20
) -> None:
    """Configure structlog and the standard library for one service process.

    Args:
        service: Bound to every line as ``service``.
        level: The minimum level.
        fmt: ``json``, ``console``, or ``auto`` (console on a terminal); a file is always JSON.
        file: Write there instead of stderr, rotating at ``max_bytes`` and keeping
            :data:`LOG_FILE_BACKUPS` older files.
        max_bytes: The size at which ``file`` is rotated.
    """
    use_console = file is None and (fmt == "console" or (fmt == "auto" and sys.stderr.isatty()))
    shared_processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[*shared_processors, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared_processors,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):  # an earlier call's file (tests configure more than once)
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.contextvars.bind_contextvars(service=service)
