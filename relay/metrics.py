"""Every Prometheus metric the relay exports, on one registry of our own.

Labels are low-cardinality by construction: listener names, mechanisms, reasons, results.
Never an address or a username.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

# No `*_created` series: they double the exposition, and the delivery process's metrics are
# summed into the daemon's scrape, where a summed timestamp would mean nothing.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD_INFO = Info("relay_build", "Relay build information", registry=REGISTRY)

CONNECTIONS = Counter("relay_connections_total", "SMTP connections accepted, by listener",
                      ["listener"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("relay_connections_refused_total",
                              "Connections refused by a connection cap", ["reason"], registry=REGISTRY)
PROXY_REFUSED = Counter("relay_proxy_refused_total",
                        "Connections to a PROXY-protocol listener closed before the session: untrusted peer, "
                        "header missing, malformed, oversize, too slow, or too many header reads at once",
                        ["reason"], registry=REGISTRY)
PROXY_HEADERS_IN_PROGRESS = Gauge("relay_proxy_headers_in_progress",
                                  "Connections to PROXY-protocol listeners still reading their header",
                                  registry=REGISTRY)
DATA_IN_FLIGHT = Gauge("relay_data_in_flight_bytes", "Bytes of DATA being received now, all sessions",
                       registry=REGISTRY)
SPOOLED = Counter("relay_messages_spooled_total", "Messages whose body went to a spool file",
                  registry=REGISTRY)
SESSIONS_ACTIVE = Gauge("relay_sessions_active", "Open SMTP sessions", registry=REGISTRY)
TLS_HANDSHAKES = Counter("relay_tls_handshakes_total", "TLS handshakes on SMTP listeners, by result",
                         ["mode", "result"], registry=REGISTRY)
AUTH_ATTEMPTS = Counter("relay_auth_attempts_total", "AUTH attempts by mechanism and result",
                        ["mechanism", "result"], registry=REGISTRY)
AUTH_LOCKOUTS = Counter("relay_auth_lockouts_total", "Client addresses locked out after failed logins",
                        registry=REGISTRY)
AUTH_CACHE = Counter("relay_auth_cache_total", "Verify-cache lookups by result", ["result"], registry=REGISTRY)
SESSIONS_TRUSTED = Counter("relay_trusted_sessions_total",
                           "Mail transactions accepted from trusted_networks without AUTH", registry=REGISTRY)
MESSAGES_ACCEPTED = Counter("relay_messages_accepted_total", "Messages accepted and queued", ["kind"],
                            registry=REGISTRY)
MESSAGES_REJECTED = Counter("relay_messages_rejected_total", "Commands and messages rejected, by reason",
                            ["reason"], registry=REGISTRY)
MESSAGE_SIZE = Histogram("relay_message_size_bytes", "Size of accepted messages",
                         buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
                         registry=REGISTRY)
ACCEPT_LATENCY = Histogram("relay_accept_duration_seconds", "Time from end of DATA to the 250 reply",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                           registry=REGISTRY)
REFUSALS = Counter("relay_mailbox_protocol_refusals_total",
                   "POP3/IMAP attempts refused (this relay hosts no mailboxes)", ["protocol"], registry=REGISTRY)
QUEUE_RECIPIENTS = Gauge("relay_queue_recipients", "Queued recipients by state", ["state"], registry=REGISTRY)
QUEUE_MESSAGES = Gauge("relay_queue_messages", "Messages in the queue", registry=REGISTRY)
QUEUE_OLDEST = Gauge("relay_queue_oldest_message_age_seconds", "Age of the oldest queued message",
                     registry=REGISTRY)
DELIVERY_ATTEMPTS = Counter("relay_delivery_attempts_total", "Per-recipient delivery attempts by result and mode",
                            ["result", "mode"], registry=REGISTRY)
DELIVERY_LATENCY = Histogram("relay_delivery_latency_seconds", "Time from acceptance to final delivery",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
                             registry=REGISTRY)
OUTBOUND_CONNECTIONS = Counter("relay_outbound_connections_total", "Outbound SMTP connections by TLS outcome",
                               ["tls"], registry=REGISTRY)
DELIVERY_TLS = Counter("relay_delivery_tls_total",
                       "Delivery attempts by outbound TLS policy (level or sts-enforce/sts-testing) and TLS "
                       "result (verified, encrypted, plain, or the failure: a TLSRPT result type, mx-mismatch, "
                       "downgrade-refused)", ["policy", "result"], registry=REGISTRY)
TLS_POLICY_FAILURES = Counter("relay_tls_policy_failures_total",
                              "MX hosts failing the TLS policy (enforced: skipped; sts-testing: used anyway), "
                              "by policy and TLSRPT result type", ["policy", "result"], registry=REGISTRY)
TLS_DOWNGRADE_REFUSED = Counter("relay_tls_downgrade_refused_total",
                                "Sessions refused because they offered less TLS than the destination had before",
                                registry=REGISTRY)
MTA_STS_FETCHES = Counter("relay_mta_sts_fetches_total", "MTA-STS policy look-ups that fetched, by result "
                          "(ok or a TLSRPT result type)", ["result"], registry=REGISTRY)
DANE_LOOKUPS = Counter("relay_dane_lookups_total", "DANE (RFC 7672) look-ups per destination domain, by result "
                       "(dane: usable TLSA; encrypt: only unusable; insecure: no DANE; bogus: deferred)", ["result"],
                       registry=REGISTRY)
BOUNCES = Counter("relay_bounces_total", "Delivery status notifications generated, by kind", ["kind"],
                  registry=REGISTRY)
STORE_COMMITS = Counter("relay_store_commits_total", "Queue commits (each one fsync under synchronous=FULL)",
                        registry=REGISTRY)
STORE_ERRORS = Counter("relay_store_errors_total", "Queue store failures by kind", ["kind"], registry=REGISTRY)
REPLY_LOST_AFTER_DOT = Counter(
    "relay_delivery_reply_lost_after_dot_total",
    "Attempts whose whole message went out but whose reply never came: the retry may be a second copy "
    "(RFC 1047)", registry=REGISTRY)
DATA_ABORTED = Counter("relay_delivery_data_aborted_total",
                       "Outbound DATA aborted (reset) before the final dot, by reason", ["reason"], registry=REGISTRY)
LEASES_LOST = Counter("relay_queue_leases_lost_total",
                      "Jobs given up because their lease was no longer ours, by where it was noticed", ["where"],
                      registry=REGISTRY)
DESTINATIONS_SUSPENDED = Counter("relay_destinations_suspended_total",
                                 "Destinations suspended after a cohort of failed attempts (dead destination)",
                                 registry=REGISTRY)
MAIL_LOOPS = Counter("relay_mail_loops_total", "Recipients failed because their mail host is this relay",
                     registry=REGISTRY)
ACCEPT_PAUSES = Counter("relay_accept_pauses_total",
                        "Times a listener paused accepting after a resource error (EMFILE...)", ["error"],
                        registry=REGISTRY)
TLS_HANDSHAKES_IN_PROGRESS = Gauge("relay_tls_handshakes_in_progress", "TLS handshakes started, not finished",
                                   registry=REGISTRY)
TLS_CERT_EXPIRY = Gauge("relay_tls_certificate_expiry_timestamp_seconds",
                        "notAfter of the certificate being served (Unix time)", registry=REGISTRY)
RELOADS = Counter("relay_reloads_total", "SIGHUP reloads (configuration and certificate, all or nothing), by result",
                  ["result"], registry=REGISTRY)
