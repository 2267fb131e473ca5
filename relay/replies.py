"""Every SMTP reply the relay sends: one code, one enhanced status (RFC 3463), one text.

Texts tell the user what to do. Tests compare against these constants, never literals.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    status: str  # enhanced status code, e.g. "5.7.1"
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.status, text)

    @property
    def permanent(self) -> bool:
        return self.code >= 500


def multiline(code: int, lines: list[str]) -> list[str]:
    """RFC 5321 4.2.1 multi-line reply: 'code-' on all but the last line."""
    return [f"{code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)]


# Greeting, session
BANNER = "ESMTP relay ready"  # after "220 <hostname> "
BYE = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RCPT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user; send mail and delivery will be attempted")
HELP = Reply(214, "2.0.0", "Submission relay: EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET, NOOP, QUIT")

# AUTH (RFC 4954)
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed logins from your address; try again later")
AUTH_LOCKED_USER = Reply(454, "4.7.0", "Too many failed logins for this account from your network; "
                                       "try again later")
AUTH_USER_UNDER_ATTACK = Reply(454, "4.7.0", "Too many failed logins for this account; try again later, "
                                             "or from a network this account has logged in from before")
CREDENTIAL_REVOKED = Reply(530, "5.7.0", "Your credential was deleted or its domain removed; "
                                        "authenticate again with a valid credential")
CREDENTIAL_CHANGED = Reply(535, "5.7.8", "Your credential's password was changed; authenticate again")
AUTH_BUSY = Reply(454, "4.7.0", "Too many logins being checked right now; try again in a moment")
AUTH_TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type; use PLAIN or LOGIN")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
AUTH_BAD_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required: log in with your SMTP credentials")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure; try again later")

# Commands and sequence
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command: finish or RSET the current transaction")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Command line too long")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
UNKNOWN_PARAM = Reply(555, "5.5.4", "Unsupported parameter")  # text names the parameter
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires MAIL FROM ... SMTPUTF8")
NON_ASCII = Reply(500, "5.5.2", "Non-ASCII command; use SMTPUTF8")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors; closing connection")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands in one session; closing connection")
TIMEOUT = Reply(421, "4.4.2", "Idle timeout; closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit reached; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down; try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections; try again later")
# Several acceptance workers and none could take the connection (all restarting, or their
# channels full): the parent says so instead of holding the client.
NO_WORKER = Reply(421, "4.3.2", "Service not available right now; try again later")
TOO_MANY_CONNECTIONS_IP = Reply(421, "4.7.0", "Too many connections from your address; try again later")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_BUSY = Reply(454, "4.7.0", "TLS not available now: too many handshakes in progress; try again later")

# POP3 / IMAP spoken to an SMTP port
NOT_A_MAILBOX = Reply(
    502, "5.5.1",
    "This server only sends mail (SMTP submission). It hosts no mailboxes: "
    "set up POP3/IMAP with your mailbox provider.")

# Envelope policy
BAD_SENDER_ADDRESS = Reply(553, "5.1.7", "Malformed sender address")
BAD_RCPT_ADDRESS = Reply(553, "5.1.3", "Malformed recipient address")
NULL_SENDER = Reply(553, "5.7.1", "Null sender not allowed from clients")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed for this credential")
SENDER_NOT_TRUSTED = Reply(553, "5.7.1", "Sender address not allowed for this network")
ROUTE_NOT_ALLOWED = Reply(553, "5.7.1", "Source routes, % and ! relaying are not allowed")
IP_LITERAL = Reply(553, "5.1.3", "Address literals are not allowed; use a domain name")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
FROM_NOT_ALLOWED = Reply(550, "5.7.1", "From: header not allowed for this credential")  # text names the rule
DOMAIN_UNVERIFIED = Reply(550, "5.7.1", "Sending domain not verified")  # text names the command

# DATA
BARE_LINE_ENDING = Reply(550, "5.6.0", "Bare CR or LF in message data is not allowed (RFC 5321 2.3.8); use CRLF")
NUL_IN_DATA = Reply(550, "5.6.0", "NUL characters are not allowed in message data")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Line longer than 998 octets (RFC 5322 2.1.1)")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many Received headers: mail loop detected")
BAD_HEADERS = Reply(550, "5.6.0", "Message has no valid header section")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
QUEUED = Reply(250, "2.0.0", "Ok: queued as")  # text gets the queue id appended

# Internal trouble: always transient, never details
INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing; try again later")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage; try again later")
# limits.max_data_in_flight: too much mail arriving at this moment; nothing is wrong with this one.
DATA_IN_FLIGHT = Reply(451, "4.3.1", "Too much mail arriving at once; try again in a few minutes")
HEADERS_TOO_LARGE = Reply(552, "5.3.4", "Header section too large")
