"""Structured log lines: `event(log, "queued", qid=..., sender=...)` -> one logfmt or JSON line.

One line per event, keyed by queue id where there is one, to stderr (journald keeps it).
Values are sanitised so a hostile client cannot forge a line with CR/LF.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_EXTRA_KEY = "relay_fields"


def _clean(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case, in C
        return text
    # Control characters could fake extra log lines or terminal escapes.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


_NEEDS_QUOTES = re.compile(r'[ ="\\]')


def _logfmt_value(value: Any) -> str:
    text = _clean(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _EXTRA_KEY, None)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}"]
        if fields is None:
            parts.append(f"event=message msg={_logfmt_value(record.getMessage())}")
        else:
            parts.extend(f"{k}={_logfmt_value(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _EXTRA_KEY, None)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        if fields is None:
            out.update(event="message", msg=record.getMessage())
        else:
            out.update({k: v if isinstance(v, (int, float, bool)) else _clean(v)
                        for k, v in fields.items() if v is not None})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event. Never pass passwords or AUTH payloads."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={_EXTRA_KEY: {"event": name, **fields}})


def setup(fmt: str = "logfmt", level: str = "info") -> None:
    # The logging HOWTO's "Optimization" switches: our lines carry no caller, thread or process
    # fields, and finding the caller walks the stack for every line (several per message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command verbatim at INFO (a POP3 "PASS secret" sent to port 25
    # would land in the journal) and each peer: keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
