"""The benchmark's pure helpers (bench/authload.py, bench/summary.py, main.cf merging in bench/run.py):
the figures in the README are only as right as these."""
from __future__ import annotations

import importlib.util
import math
import ssl
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import authload  # noqa: E402
import summary  # noqa: E402


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_percentile_is_nearest_rank():
    vals = list(range(1, 101))  # 1..100
    assert authload.percentile(vals, 50) == 50
    assert authload.percentile(vals, 99) == 99
    assert authload.percentile(vals, 100) == 100
    assert authload.percentile(vals, 0) == 1
    # Fewer than 100 values: p99 is the maximum, never an interpolation.
    assert authload.percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert authload.percentile([5.0], 50) == 5.0
    assert math.isnan(authload.percentile([], 50))
    with pytest.raises(ValueError):
        authload.percentile([1.0], 101)


def test_split_evenly_sums_to_total():
    assert authload.split_evenly(3000, 20) == [150] * 20
    parts = authload.split_evenly(1001, 20)
    assert sum(parts) == 1001 and max(parts) - min(parts) == 1 and parts[0] == 51
    assert authload.split_evenly(3, 5) == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        authload.split_evenly(10, 0)


def test_tls_cap():
    assert authload.tls_cap("1.3") is None
    assert authload.tls_cap("1.2") is ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError):
        authload.tls_cap("1.1")


def test_reply_code():
    assert authload.reply_code(b"250 2.0.0 Ok: queued\r") == 250
    assert authload.reply_code(b"250-PIPELINING\r") is None
    assert authload.reply_code(b"235 ") == 235
    with pytest.raises(ValueError):
        authload.reply_code(b"hello")


def test_message_size_and_no_leading_dot():
    m = authload.make_message(10240, "a@b.example", "c@d.example")
    assert 10240 - 80 < len(m) <= 10240
    assert b"\r\n." not in m and m.endswith(b"\r\n")


def test_spread_and_ratios():
    assert summary.spread([]) == "-"
    assert summary.spread([None, 5.0]) == "5"
    assert summary.spread([900.0, 1000.0, 1100.0]) == "1,000 [900-1,100]"
    assert summary.spread([1.234, 2.0, 3.0], 2) == "2.00 [1.23-3.00]"
    assert summary.per_rep_ratios([2.0, None, 3.0], [1.0, 1.0, 0.0]) == [2.0]


def test_cell_verdict_needs_every_rep():
    c = summary.Cell("x", "cmd", relay=[2.0, 3.0], postfix=[1.0, 1.0])
    assert c.verdict() == "better in every rep"
    c = summary.Cell("x", "cmd", relay=[2.0, 0.5], postfix=[1.0, 1.0])
    assert c.verdict() == "mixed"
    lat = summary.Cell("p99", "cmd", unit="ms", higher_is_better=False, relay=[30.0], postfix=[20.0])
    assert lat.verdict() == "worse in every rep"
    cpu = summary.Cell("client", "cmd", relay=[1.0], postfix=[2.0], compare=False, note="n")
    assert cpu.ratios() == [] and cpu.ratio_text() == "-"


def test_table_lists_every_command():
    cells = [summary.Cell("a", "bench/run.py --scenarios 2", relay=[1.0, 2.0], postfix=[1.0, 1.0]),
             summary.Cell("ceiling", "bench/run.py --scenarios 2", relay=[9000.0], note="not an MTA")]
    out = summary.table(cells)
    assert "| a | 2 [1-2] msgs/s | 1 [1-1] msgs/s | 1.50 [1.00-2.00] (per rep 1.00, 2.00) | mixed | A |" in out
    assert "| ceiling | 9,000 msgs/s |  | - | not an MTA | A |" in out
    assert out.count("- A: `bench/run.py --scenarios 2`") == 1 and "- B:" not in out


def test_main_cf_overrides_replace_earlier_settings():
    run = _run_module()
    base = "# c = 1\nmynetworks = 127.0.0.0/8\nsmtpd_tls_security_level = none\n  continued = x\n"
    out = run.main_cf(base, "\nsmtpd_tls_security_level = may\nsmtpd_sasl_auth_enable = yes\n")
    lines = out.splitlines()
    assert lines.count("smtpd_tls_security_level = may") == 1
    assert "smtpd_tls_security_level = none" not in lines
    assert "mynetworks = 127.0.0.0/8" in lines and "# c = 1" in lines and "  continued = x" in lines
