"""Exactly-once delivery against hostile receivers (issue 11, "Attempts that cannot repeat").

The real relay process delivers to a HostileMX on 127.0.0.2 (bob@hostile.example); bounces go
to the sender's domain, an ordinary MXSink on 127.0.0.1 sharing the port (delivery.mx_port is
one port for every MX host). Each test asserts what the receiver COMPLETED (its whole final dot
arrived: that is when a real MX takes the message) and that the message settles: delivered
once, deferred with a reason in `relay queue show`, or bounced.

Small timeouts in config keep every test bounded; waits are on conditions with deadlines, and
each wait also stops at the first sign of the failure it guards against (a second copy), so a
broken relay fails fast rather than at the deadline.
"""
from __future__ import annotations

import pytest

from tests.support.hostile_mx import HostileMX
from tests.support.hostile_relay import (
    SENDER_DOMAIN, assert_left_queue, deferred_with_reason, delivered, metric, no_traceback, outcomes, point,
    queue_show, start_relay, submit, until,
)
from tests.support.mx_sink import MXSink

RCPT = "bob@hostile.example"
LOST_AFTER_DOT = "relay_delivery_reply_lost_after_dot_total"


@pytest.fixture
def peers(dns_server):
    """(hostile MX for hostile.example on 127.0.0.2, ordinary sink for the sender's bounces on 127.0.0.1)."""
    with HostileMX(host="127.0.0.2") as mx, MXSink(host="127.0.0.1", port=mx.port) as home:
        point(dns_server, "hostile.example", "127.0.0.2")
        point(dns_server, SENDER_DOMAIN, "127.0.0.1")
        yield mx, home


def big_body_size() -> int:
    """Twice the largest kernel send buffer plus 2 MB, at most 20 MB (under message_size, 25 MB)."""
    try:
        wmem_max = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return min(20_000_000, 2 * wmem_max + 2_000_000)


def copies(mx: HostileMX, subject: str) -> int:
    return sum(1 for s in mx.subjects() if s == subject)


def quiet(mx: HostileMX, timeout: float = 20) -> None:
    """Every connection to the MX has ended: no transfer still in progress can add a copy."""
    until(lambda: mx.active == 0, timeout, "every connection to the hostile MX to end")


# ---------------------------------------------------------------- slow reader


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slow_reader_gets_a_large_message_exactly_once(make_relay, dns_server, peers):
    """3 MB read at 300 KB/s (~10 s) with command_timeout = 2: the upload makes progress, so it is
    not a timeout, and the reply to the dot has its own, long wait (data_done_timeout)."""
    mx, home = peers
    mx.data_rate = 300_000
    relay = start_relay(make_relay, dns_server, mx.port, command_timeout=2, retry_schedule=[1, 2, 4])
    qid = submit(relay, RCPT, "slow-reader", size=3_000_000)
    until(lambda: delivered(relay, qid) or copies(mx, "slow-reader") > 1, 90,
          "delivery (or a second copy)")
    assert copies(mx, "slow-reader") == 1, f"{copies(mx, 'slow-reader')} copies; outcomes {outcomes(relay, qid)}"
    assert delivered(relay, qid), outcomes(relay, qid)
    assert_left_queue(relay, qid)
    quiet(mx)
    assert copies(mx, "slow-reader") == 1
    assert outcomes(relay, qid) == ["delivered"]
    assert not home.messages  # no bounce, no delay warning
    no_traceback(relay)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_reader_that_stops_reading_is_reset_and_never_completes_a_copy(make_relay, dns_server, peers):
    """The receiver stops reading 256 KB into the body for longer than data_xfer_timeout, then
    reads again. The relay must have aborted with an RST before the dot was out: when the reader
    resumes there is nothing left to complete. (A graceful close would leave the rest, dot
    included, in the socket buffers, and the copy would complete here and again at every retry.)

    The body is larger than the sender's kernel send buffer can ever grow (tcp_wmem max, 4 MB
    by default): a body the kernel swallows whole has "left" the relay, which then rightly waits
    for the reply to the dot, and the stalled-transfer path would not be exercised."""
    mx, home = peers
    mx.stop_reading_after = 256 * 1024
    mx.stop_reading_for = 6.0
    relay = start_relay(make_relay, dns_server, mx.port, data_xfer_timeout=2, command_timeout=30,
                        retry_schedule=[3600])
    qid = submit(relay, RCPT, "stopped-reader", size=big_body_size())
    until(lambda: deferred_with_reason(relay, qid) or mx.messages, 30, "the attempt to be deferred")
    until(lambda: mx.stalled_reads >= 1 and mx.settled, 20, "the stalled connection to end")
    assert not mx.messages, "a copy completed: the stalled transfer was not aborted (RST) before the dot"
    assert mx.partials == 1
    assert mx.ended() == ["reset"], f"the stalled connection ended {mx.ended()}, not with a TCP RST"
    m = deferred_with_reason(relay, qid)
    assert m is not None, queue_show(relay, qid)
    assert outcomes(relay, qid) == ["deferred"]

    # The receiver recovers: an operator's retry delivers the one copy, and the message settles.
    mx.stop_reading_after = None
    relay.cli("queue", "retry", "--all", check=True)
    until(lambda: delivered(relay, qid), 30, "delivery after the retry")
    assert_left_queue(relay, qid)
    quiet(mx)
    assert copies(mx, "stopped-reader") == 1
    assert not home.messages
    no_traceback(relay)


# ---------------------------------------------------------------- late reply to the dot


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_reply_to_the_dot_after_the_lease_is_one_delivery(make_relay, dns_server, peers):
    """lease_seconds = 2 and the receiver answers the dot after 5 s: the heartbeat keeps the lease,
    nobody claims the job while it is in flight, and the 250 settles it as delivered."""
    mx, home = peers
    mx.dot_reply_delay = 5.0
    relay = start_relay(make_relay, dns_server, mx.port, lease_seconds=2, attempt_timeout=30,
                        data_done_timeout=20, command_timeout=10, retry_schedule=[1, 2, 4])
    qid = submit(relay, RCPT, "late-dot")
    until(lambda: delivered(relay, qid) or copies(mx, "late-dot") > 1, 40, "delivery (or a second copy)")
    assert copies(mx, "late-dot") == 1, f"{copies(mx, 'late-dot')} copies over {mx.connections} connections"
    assert_left_queue(relay, qid)
    quiet(mx)
    assert copies(mx, "late-dot") == 1 and mx.connections == 1
    assert outcomes(relay, qid) == ["delivered"]
    assert not home.messages
    no_traceback(relay)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_tarpit_answering_every_command_late_is_one_delivery(make_relay, dns_server, peers):
    """Each reply after 1 s (EHLO, MAIL, RCPT, DATA, dot: ~5 s) against lease_seconds = 2: the attempt
    outlives its lease several times over and must still be made once."""
    mx, home = peers
    mx.command_delay = 1.0
    relay = start_relay(make_relay, dns_server, mx.port, lease_seconds=2, attempt_timeout=30,
                        command_timeout=5, retry_schedule=[1, 2, 4])
    qid = submit(relay, RCPT, "tarpit-each")
    until(lambda: delivered(relay, qid) or copies(mx, "tarpit-each") > 1 or mx.connections > 1, 40,
          "delivery (or a second attempt)")
    assert copies(mx, "tarpit-each") <= 1 and mx.connections == 1, \
        f"{copies(mx, 'tarpit-each')} copies over {mx.connections} connections"
    until(lambda: delivered(relay, qid), 30, "delivery")
    assert_left_queue(relay, qid)
    quiet(mx)
    assert copies(mx, "tarpit-each") == 1
    assert outcomes(relay, qid) == ["delivered"]
    no_traceback(relay)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_reply_lost_after_the_dot_defers_and_counts_the_possible_duplicate(make_relay, dns_server, peers):
    """The receiver takes the whole dot but answers after data_done_timeout: RFC 1047's case, the one
    duplicate an SMTP client cannot avoid. At most one copy per attempt, the attempt deferred with a
    reason, the possible duplicate counted and logged; the next attempt delivers and settles."""
    mx, home = peers
    mx.dot_reply_delay = 6.0
    relay = start_relay(make_relay, dns_server, mx.port, data_done_timeout=2, command_timeout=5,
                        retry_schedule=[3600])
    qid = submit(relay, RCPT, "lost-reply")
    until(lambda: deferred_with_reason(relay, qid) or copies(mx, "lost-reply") > 1, 30, "the deferral")
    assert copies(mx, "lost-reply") == 1  # the receiver has it; we could not know
    m = deferred_with_reason(relay, qid)
    assert m is not None, queue_show(relay, qid)
    assert outcomes(relay, qid) == ["deferred"]
    assert metric(relay, LOST_AFTER_DOT) == 1
    # Keyed by queue id like every log line (docs/architecture.md, habit 6): the operator must be
    # able to tell WHICH message may reach its recipient twice.
    until(lambda: relay.events_named("reply_lost_after_dot", qid=qid), 5, "the reply_lost_after_dot log line")

    mx.dot_reply_delay = 0
    relay.cli("queue", "retry", "--all", check=True)
    until(lambda: delivered(relay, qid), 30, "delivery after the retry")
    assert_left_queue(relay, qid)
    quiet(mx)
    # Two copies in all, one per attempt (connection), and exactly the one that was counted.
    per_connection = [m.connection for m in mx.messages]
    assert len(per_connection) == 2 and len(set(per_connection)) == 2, per_connection
    assert metric(relay, LOST_AFTER_DOT) == 1
    assert not home.messages
    no_traceback(relay)


# ---------------------------------------------------------------- close mid-DATA


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_close_mid_data_defers_then_delivers_once(make_relay, dns_server, peers, how):
    mx, home = peers
    mx.close_after_data_bytes = 200_000
    mx.close_how = how
    relay = start_relay(make_relay, dns_server, mx.port, command_timeout=10, retry_schedule=[3600])
    qid = submit(relay, RCPT, "mid-data", size=1_000_000)
    until(lambda: deferred_with_reason(relay, qid), 20, "the deferral")
    until(lambda: mx.settled, 10, "the cut connection to be booked")
    assert not mx.messages and mx.partials == 1
    assert outcomes(relay, qid) == ["deferred"]

    mx.close_after_data_bytes = None
    relay.cli("queue", "retry", "--all", check=True)
    until(lambda: delivered(relay, qid), 20, "delivery after the retry")
    assert_left_queue(relay, qid)
    quiet(mx)
    assert copies(mx, "mid-data") == 1
    assert not home.messages
    no_traceback(relay)
