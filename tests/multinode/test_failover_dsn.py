"""Failover the way docs/multinode.md configures it: every node's storage.dsn lists the primary
and the synchronous standby with target_session_attrs=read-write. The primary is SIGKILLed
during load and the standby promoted; nothing re-points the nodes. Every 250'd message is
delivered (issue 17: "Standby promotion during load: 0 acknowledged messages lost").

Its own small cluster (one synchronous standby), so test_cluster.py's promotion, which
re-points the nodes' database proxies instead, is not the only way this is proven."""
from __future__ import annotations

import pytest

from tests.support import tools
from tests.support.multinode import Cluster, Load, kill_postgres

pytestmark = [tools.needs("haproxy", "initdb", "pg_ctl", "pg_basebackup",
                          reason="Debian packages haproxy and postgresql; CI installs them"),
              pytest.mark.slow]

MESSAGES = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tools.postgresql()
    c = Cluster(tmp_path_factory.mktemp("failover-dsn"), standbys_wanted=("s1",), sync_names="s1",
                lease_seconds=3, commit_timeout=3.0, failover_dsn=True)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_promotion_found_by_the_dsn_loses_nothing_acknowledged(cluster):
    assert cluster.replication() == {"s1": ("streaming", "sync")}
    assert "target_session_attrs=read-write" in cluster.nodes[0].config["storage"]["dsn"]
    load = Load(cluster.haproxy.listen_port, MESSAGES, prefix="dsn").start()
    load.wait_progress(int(MESSAGES * 0.4), timeout=60)
    old = cluster.pg
    kill_postgres(old)
    new = cluster.standbys.pop("s1")
    new.promote()
    cluster.pg = new
    cluster.standbys["old-primary"] = old  # removed at teardown
    result = load.join()
    assert not result.gave_up, (len(result.gave_up), result.refusals[-5:])
    cluster.wait_drained(90)
    audit = cluster.audit(result.accepted)
    assert audit.lost == [], audit
    print(f"failover by DSN: accepted={len(result.accepted)} {audit} codes={result.codes}")
