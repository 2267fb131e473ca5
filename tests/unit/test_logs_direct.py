"""relay.logs.event's direct path (no LogRecord when only our handler would see the line) writes
exactly what the formatter writes for a record, and steps aside for any other handler."""
from __future__ import annotations

import json
import logging

import pytest

from relay import logs


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved:
        root.addHandler(h)
    root.setLevel(level)
    logs._direct = None


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_the_direct_line_is_the_formatters_line(capsys, restore_logging, fmt):
    logs.setup(fmt, "info")
    log = logging.getLogger("relay.test")
    fields = {"qid": "ABC", "client": "127.0.0.1", "text": 'a "quoted" value\r\nforged=1', "n": 3, "none": None}
    logs.event(log, "queued", logging.WARNING, **fields)
    line = capsys.readouterr().err.rstrip("\n")
    assert "\n" not in line  # the CR/LF in a value cannot start a line of its own
    rec = logging.LogRecord("relay.test", logging.WARNING, __file__, 1, "queued", None, None)
    setattr(rec, logs._EXTRA_KEY, {"event": "queued", **fields})
    formatter = logs.JSONFormatter() if fmt == "json" else logs.LogfmtFormatter()
    expected = formatter.format(rec)
    # Same line but for the clock: each carries its own millisecond.
    strip = (lambda s: {k: v for k, v in json.loads(s).items() if k != "ts"}) if fmt == "json" else \
        (lambda s: s.split(" ", 1)[1])
    assert strip(line) == strip(expected)
    assert "none" not in line and ("level=warning" in line or '"level": "warning"' in line)


def test_another_handler_gets_the_record_as_before(restore_logging, capsys):
    logs.setup("logfmt", "info")
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logging.getLogger().addHandler(Collect())  # as pytest's caplog or an operator's extra handler
    logs.event(logging.getLogger("relay.test"), "connect", client="127.0.0.1")
    [rec] = seen
    assert getattr(rec, logs._EXTRA_KEY) == {"event": "connect", "client": "127.0.0.1"}
    assert "event=connect client=127.0.0.1" in capsys.readouterr().err  # and our handler still writes it


def test_below_the_level_nothing_is_written(capsys, restore_logging):
    logs.setup("logfmt", "warning")
    logs.event(logging.getLogger("relay.test"), "connect", client="127.0.0.1")
    assert capsys.readouterr().err == ""
