"""llorch-cpud's `--log-format json`: one JSON object per line, for log shippers."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

CONTEXT_FIELDS = ("job_id", "request_id")   # set through logging's extra= where a line concerns one


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", "job_id"?, "request_id"?, "exception"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update({name: getattr(record, name) for name in CONTEXT_FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True)   # escaped: a lone surrogate cannot break the line
