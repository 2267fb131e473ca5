"""Structured log lines: `event(log, "queued", qid=..., sender=...)` -> one logfmt or JSON line.

One line per event, keyed by queue id where there is one, to stderr (journald keeps it).
Values are sanitised so a hostile client cannot forge a line with CR/LF.
"""
from __future__ import annotations

import asyncio
import atexit
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


_second: list[Any] = [None, ""]  # the last whole second seen and its formatted text


def _timestamp(created: float) -> str:
    sec = int(created)
    if _second[0] != sec:  # strftime once a second, not once a line
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{int((created - sec) * 1000):03d}Z"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _EXTRA_KEY, None)
        if fields is None:
            fields = {"event": "message", "msg": record.getMessage()}
        line = self.format_event(record.levelname.lower(), record.created, fields)
        if record.exc_info:
            line += f" exc={_logfmt_value(self.formatException(record.exc_info))}"
        return line

    @staticmethod
    def format_event(level: str, created: float, fields: dict[str, Any]) -> str:
        parts = [f"ts={_timestamp(created)}", f"level={level}"]
        parts.extend(f"{k}={_logfmt_value(v)}" for k, v in fields.items() if v is not None)
        return " ".join(parts)


# json.dumps(..., ensure_ascii=False) builds a new JSONEncoder for every call; one is enough.
_JSON = json.JSONEncoder(ensure_ascii=False)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _EXTRA_KEY, None)
        if fields is None:
            fields = {"event": "message", "msg": record.getMessage()}
        if not record.exc_info:
            return self.format_event(record.levelname.lower(), record.created, fields)
        out = json.loads(self.format_event(record.levelname.lower(), record.created, fields))
        out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)

    @staticmethod
    def format_event(level: str, created: float, fields: dict[str, Any]) -> str:
        out: dict[str, Any] = {"ts": _timestamp(created), "level": level}
        out.update({k: v if isinstance(v, (int, float, bool)) else _clean(v)
                    for k, v in fields.items() if v is not None})
        return _JSON.encode(out)


_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                logging.ERROR: "error", logging.CRITICAL: "critical"}
# Set by setup(): our one handler and its formatter, for event()'s direct path.
_direct: tuple[logging.StreamHandler, Any] | None = None


def _only_our_handler(log: logging.Logger) -> bool:
    """Nothing but setup()'s handler would see this record (no handler or filter of its own on
    the way up, none added to the root, e.g. by pytest's caplog): the line can be written
    directly."""
    assert _direct is not None
    node: logging.Logger | None = log
    while node is not None and node is not logging.root:
        if node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent  # type: ignore[assignment]
    root = logging.root
    return len(root.handlers) == 1 and root.handlers[0] is _direct[0] and not root.filters


# Lines written on an event loop wait in `_pending` until the end of the loop's current pass
# (one call_soon): the several lines of a pass, e.g. many sessions' connect/queued/disconnect
# under load, become one write(2) instead of one each. Off the loop (threads, the CLI, tests)
# a line is written at once, after what is pending.
_pending: list[str] = []
_flush_scheduled = False


def _flush_pending() -> None:
    global _flush_scheduled
    _flush_scheduled = False
    if not _pending or _direct is None:
        _pending.clear()
        return
    handler = _direct[0]
    with handler.lock:  # type: ignore[union-attr]
        lines = _pending[:]
        del _pending[:len(lines)]  # a thread's line appended meanwhile stays for the next write
        text = "".join(lines)
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:  # noqa: BLE001 - as logging does: a log line never takes the relay down
            handler.handleError(logging.makeLogRecord({"msg": "log write"}))


atexit.register(_flush_pending)


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event. Never pass passwords or AUTH payloads.

    Several lines a message: when only our own handler would see the line it is formatted and
    written directly, without a LogRecord and the logging module's dispatch (they were half of
    the cost of a line, and lines were 15 % of the acceptance process at 10 KB messages); on
    the event loop the lines of one pass of the loop are written together."""
    global _flush_scheduled
    if not log.isEnabledFor(level):
        return
    direct = _direct
    if direct is not None and level in _LEVEL_NAMES and _only_our_handler(log):
        line = direct[1].format_event(_LEVEL_NAMES[level], time.time(), {"event": name, **fields})
        _pending.append(line + "\n")
        if level >= logging.ERROR:
            _flush_pending()  # an error line goes out now, whatever comes next
            return
        loop = asyncio._get_running_loop()
        if loop is None:
            _flush_pending()
        elif not _flush_scheduled:
            _flush_scheduled = True
            try:
                loop.call_soon(_flush_pending)
            except RuntimeError:  # the loop is closing
                _flush_pending()
        return
    if _pending:
        _flush_pending()  # in order with the lines already waiting
    log.log(level, name, extra={_EXTRA_KEY: {"event": name, **fields}})


def setup(fmt: str = "logfmt", level: str = "info") -> None:
    # The logging HOWTO's "Optimization" switches: our lines carry no caller, thread or process
    # fields, and finding the caller walks the stack for every line (several per message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _direct
    handler = logging.StreamHandler(sys.stderr)
    formatter = JSONFormatter() if fmt == "json" else LogfmtFormatter()
    handler.setFormatter(formatter)
    _direct = (handler, formatter)
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
