"""The OpenAPI 3.1 document served at /api/v1/openapi.json, written by hand (a dict, so a test
can hold every response of every endpoint to it)."""
from __future__ import annotations

from typing import Any

ERROR_CODES = ["bad_request", "malformed_json", "unauthorized", "forbidden", "not_found", "method_not_allowed",
               "conflict", "credential_limit", "too_large", "unsupported_media_type", "invalid", "unknown_field",
               "rate_limited", "unavailable", "internal"]

NUM = {"type": "number"}
NUM_OR_NULL = {"type": ["number", "null"]}
STR = {"type": "string"}
STR_OR_NULL = {"type": ["string", "null"]}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _items(name: str) -> dict[str, Any]:
    return _obj({"items": {"type": "array", "items": _ref(name)}})


SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({"code": {"type": "string", "enum": ERROR_CODES}, "message": STR})}),
    "Domain": _obj({
        "name": STR, "display": STR, "created_at": NUM, "verified_at": NUM_OR_NULL,
        "state": {"type": "string", "enum": ["verified", "unverified"]},
        "credentials": {"type": "integer", "minimum": 0}, "credential_cap": {"type": "integer", "minimum": 0},
        "dkim_selector": STR_OR_NULL, "sent_24h": {"type": "integer", "minimum": 0},
        "deferred_24h": {"type": "integer", "minimum": 0}, "bounced_24h": {"type": "integer", "minimum": 0}}),
    "DomainList": _items("Domain"),
    "DomainRemoved": _obj({"removed": STR, "removed_credentials": {"type": "integer", "minimum": 0}}),
    "DnsRecord": _obj({"type": STR, "name": STR, "value": STR, "purpose": STR, "required": {"type": "boolean"}}),
    "DnsRecordList": _items("DnsRecord"),
    "RecordCheck": _obj({
        "type": STR, "name": STR, "purpose": STR, "required": {"type": "boolean"}, "expected": STR,
        "found": {"type": "array", "items": STR},
        "status": {"type": "string", "enum": ["ok", "missing", "mismatch", "optional", "error"]},
        "checked_at": NUM}),
    "Verification": _obj({"domain": STR, "verified": {"type": "boolean"},
                          "records": {"type": "array", "items": _ref("RecordCheck")}}),
    "Credential": _obj({"username": STR, "domain": STR, "created_at": NUM, "updated_at": NUM,
                        "last_login": NUM_OR_NULL, "last_failed_login": NUM_OR_NULL}),
    "CredentialList": _items("Credential"),
    "CredentialCreated": _obj({"credential": _ref("Credential"), "password": STR}),
    "PasswordReset": _obj({"login": STR, "password": STR}),
    "CredentialDeleted": _obj({"deleted": STR}),
    "QueueItem": _obj({"id": STR, "sender": STR, "created_at": NUM, "size": {"type": "integer"},
                       "recipients": {"type": "array", "items": STR}, "state": STR,
                       "next_attempt_at": NUM_OR_NULL, "last_error": STR_OR_NULL, "finished_at": NUM_OR_NULL}),
    "QueuePage": _obj({"items": {"type": "array", "items": _ref("QueueItem")}, "next": STR_OR_NULL}),
    "Recipient": _obj({"address": STR, "route": STR, "state": STR, "attempts": {"type": "integer"},
                       "next_attempt_at": NUM_OR_NULL, "last_error": STR_OR_NULL, "remote_mta": STR_OR_NULL,
                       "in_flight": {"type": "boolean"}}),
    "Attempt": _obj({"ts": NUM, "recipient": STR_OR_NULL, "event": STR, "reply": STR_OR_NULL,
                     "host": STR_OR_NULL, "tls": STR_OR_NULL, "tls_policy": STR_OR_NULL,
                     "tls_cipher": STR_OR_NULL, "tls_verified": {"type": ["boolean", "null"]}}),
    "Message": _obj({"id": STR, "sender": STR, "created_at": NUM, "size": {"type": "integer"},
                     "auth_user": STR_OR_NULL, "client_ip": STR_OR_NULL, "state": STR, "finished_at": NUM_OR_NULL,
                     "dkim_domain": STR_OR_NULL, "dkim_signed": {"type": "boolean"},
                     "headers": STR, "recipients": {"type": "array", "items": _ref("Recipient")},
                     "attempts": {"type": "array", "items": _ref("Attempt")}}),
    "Retried": _obj({"id": STR, "due_now": {"type": "integer", "minimum": 0}}),
    "MessageDeleted": _obj({"deleted": STR, "bounced": {"type": "boolean"}}),
    "NewDomain": _obj({"name": {"type": "string", "minLength": 1, "maxLength": 253}, "dkim": {"type": "boolean"}},
                      ["name"]),
    "NewCredential": _obj({"login": {"type": "string", "minLength": 1, "maxLength": 320},
                           "password": {"type": "string", "minLength": 12, "maxLength": 1024}}, ["login"]),
    "NewPassword": _obj({"password": {"type": "string", "minLength": 12, "maxLength": 1024}}, []),
}

_ERR_TEXT = {400: "Malformed JSON or not UTF-8", 401: "Missing, unknown or revoked API key",
             403: "The key's scope does not allow this", 404: "No such domain, credential or message",
             409: "Conflict: exists already, still in use, or the credential limit (credential_limit)",
             413: "Request body too large", 415: "Body not application/json",
             422: "Invalid input or unknown field", 429: "Too many failed API keys from this address",
             500: "Internal error", 503: "The store is busy or full; try again"}


def _error(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": _ERR_TEXT[status],
                           "content": {"application/json": {"schema": _ref("Error")}}}
    if status == 429:
        out["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return out


def _op(op_id: str, summary: str, ok: int, schema: str, *, write: bool, body: str | None = None,
        body_required: bool = True, params: list[dict] | None = None, secret: bool = False,
        errors: tuple[int, ...] = ()) -> dict[str, Any]:
    codes = {401, 404, 422, 429, 500, 503} | set(errors)
    if write:
        codes |= {403}
    if body:
        codes |= {400, 413, 415}
    success: dict[str, Any] = {"description": "OK" if ok == 200 else "Created",
                               "content": {"application/json": {"schema": _ref(schema)}}}
    if secret:
        success["description"] += "; the password appears only in this answer (Cache-Control: no-store)"
    out: dict[str, Any] = {"operationId": op_id, "summary": summary,
                           "responses": {str(ok): success, **{str(c): _error(c) for c in sorted(codes)}}}
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = {"required": body_required,
                              "content": {"application/json": {"schema": _ref(body)}}}
    return out


def _path(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


DOMAIN = _path("domain", "A sending domain, e.g. mg.example.com")
LOGIN = _path("login", "The credential's login: the full address, or its local part")
QID = _path("qid", "A queue id")
BOOL_Q = {"type": "string", "enum": ["true", "false", "1", "0"]}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "relay HTTP API", "version": "1",
             "description": "Sending domains, their SMTP credentials (at most credentials.per_domain each) and "
                            "the mail queue, over the same operations as the CLI and the web admin. "
                            "Authenticate with an API key from `relay admin api-key add NAME --scope read|write`, "
                            "sent as `Authorization: Bearer <token>`. Errors are "
                            '`{"error": {"code": ..., "message": ...}}` with a stable code.'},
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}],
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
    "paths": {
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1",
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object"}}}}}}},
        "/domains": {
            "get": _op("listDomains", "Sending domains, with credentials used and last-24 h outcomes", 200,
                       "DomainList", write=False),
            "post": _op("addDomain", "Add a sending domain (with a DKIM key unless dkim is false)", 201, "Domain",
                        write=True, body="NewDomain", errors=(409,)),
        },
        "/domains/{domain}": {
            "parameters": [DOMAIN],
            "get": _op("getDomain", "One sending domain", 200, "Domain", write=False),
            "delete": _op("removeDomain", "Remove a domain (force: with its credentials, despite queued mail)",
                          200, "DomainRemoved", write=True, errors=(409,),
                          params=[_q("force", "also remove its credentials; ignore queued mail", BOOL_Q)]),
        },
        "/domains/{domain}/verify": {
            "parameters": [DOMAIN],
            "post": _op("verifyDomain", "Look the records up through the relay's resolver; verified when DKIM "
                                        "and SPF are right", 200, "Verification", write=True),
        },
        "/domains/{domain}/records": {
            "parameters": [DOMAIN],
            "get": _op("domainRecords", "The DNS records to publish", 200, "DnsRecordList", write=False),
        },
        "/domains/{domain}/credentials": {
            "parameters": [DOMAIN],
            "get": _op("listCredentials", "The domain's SMTP credentials", 200, "CredentialList", write=False),
            "post": _op("createCredential", "Create a credential; the password is generated when absent and "
                                            "returned once", 201, "CredentialCreated", write=True,
                        body="NewCredential", secret=True, errors=(409,)),
        },
        "/domains/{domain}/credentials/{login}": {
            "parameters": [DOMAIN, LOGIN],
            "put": _op("resetCredential", "Set a new password (generated when absent, returned once)", 200,
                       "PasswordReset", write=True, body="NewPassword", body_required=False, secret=True),
            "delete": _op("deleteCredential", "Delete a credential: its next AUTH fails", 200, "CredentialDeleted",
                          write=True),
        },
        "/queue": {
            "get": _op("listQueue", "Messages, oldest first, one keyset page at a time", 200, "QueuePage",
                       write=False, params=[
                           _q("state", "which messages", {"type": "string", "enum": [
                               "active", "pending", "deferred", "finished", "delivered", "failed", "all"]}),
                           _q("domain", "sending domain (the credential's or the sender's)"),
                           _q("sender", "part of the sender address"),
                           _q("recipient", "part of a recipient address"),
                           _q("qid", "queue id prefix"),
                           _q("after", "the `next` cursor of the previous page"),
                           _q("limit", "page size", {"type": "integer", "minimum": 1, "maximum": 500})]),
        },
        "/queue/{qid}": {
            "parameters": [QID],
            "get": _op("showMessage", "One message: envelope, header block, recipients, every attempt", 200,
                       "Message", write=False),
            "delete": _op("deleteMessage", "Delete a message (bounce: send the sender a failure report)", 200,
                          "MessageDeleted", write=True,
                          params=[_q("bounce", "queue a failure report to the sender", BOOL_Q)]),
        },
        "/queue/{qid}/retry": {
            "parameters": [QID],
            "post": _op("retryMessage", "Make the message's waiting recipients due now", 200, "Retried",
                        write=True),
        },
    },
}
