"""TLSRPT (RFC 8460): the per-day, per-policy-domain session counts and the JSON report built
from them. Pure: counting happens in `tls_policy.TLSPolicy.count` (kept in memory, flushed to
the store's `tlsrpt_counts` in batches); this module turns stored rows into the report.

Sending the report (the `rua` of `_smtp._tls.<domain>`, mailto: through our own queue, https:
by POST, daily after 00:00 UTC) is not built yet; `build_report` + `gzip_report` are what
that job will send (`application/tlsrpt+gzip`, RFC 8460 5.3).
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

# Our own failure names, mapped to the result types of RFC 8460 4.3 (IANA registry).
_RESULT_TYPE = {
    "mx-mismatch": "validation-failure",   # an MX outside the MTA-STS policy (no specific type exists)
}
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid"})


@dataclass(frozen=True)
class CountRow:
    day: str                 # UTC date, YYYY-MM-DD
    policy_domain: str
    policy_type: str         # sts | tlsa | no-policy-found
    policy_string: str       # JSON list of the policy's lines ([] without a policy)
    mx_host: str             # receiving MX host name
    result: str              # "" = a successful session, else a result type (or one of ours, mapped)
    count: int


def result_type(result: str) -> str:
    r = _RESULT_TYPE.get(result, result)
    return r if r in RESULT_TYPES else "validation-failure"


def policy_lines(mode: str, mx: Iterable[str], max_age: int) -> list[str]:
    """The policy as RFC 8460 4.4 `policy-string` wants it: its lines, in a canonical order."""
    return ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]


def build_report(rows: Iterable[CountRow], *, day: str, organization: str, contact: str,
                 report_id: str) -> dict[str, Any]:
    """RFC 8460 4.4: one report for one UTC day, one entry per (policy domain, policy)."""
    groups: dict[tuple[str, str, str], list[CountRow]] = defaultdict(list)
    for r in rows:
        if r.day == day:
            groups[(r.policy_domain, r.policy_type, r.policy_string)].append(r)
    policies = []
    for (domain, ptype, pstring), members in sorted(groups.items()):
        ok = sum(r.count for r in members if not r.result)
        failures: dict[tuple[str, str], int] = defaultdict(int)
        for r in members:
            if r.result:
                failures[(result_type(r.result), r.mx_host)] += r.count
        lines = json.loads(pstring) if pstring else []
        policy: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
        if lines:
            policy["policy-string"] = lines
            if ptype == "tlsa":
                # DANE: the policy string is the host's TLSA RRset; mx-host names the host(s) it is for.
                policy["mx-host"] = sorted({r.mx_host for r in members})
            else:
                policy["mx-host"] = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("mx:")]
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": sum(failures.values())},
        }
        if failures:
            entry["failure-details"] = [{"result-type": rt, "receiving-mx-hostname": mx, "failed-session-count": n}
                                        for (rt, mx), n in sorted(failures.items())]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def gzip_report(report: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)
