"""Request bodies and query strings, checked before anything runs: the body size cap, JSON
only, UTF-8 only, an object with known fields of the right types. Each refusal is an
ApiError with a stable code."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

MAX_BODY = 64 * 1024  # the largest legitimate body is a login and a password


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refusing past `limit` without reading it all (chunked bodies too)."""
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "too_large", f"request body over {limit} bytes")
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(16384)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: web.Request, fields: dict[str, type | tuple[type, ...]], *,
                      required: tuple[str, ...] = (), limit: int = MAX_BODY) -> dict[str, Any]:
    """The body as a JSON object with only `fields` (name -> type), `required` among them.
    An empty body is an empty object (every field optional then)."""
    raw = await read_body(request, limit)
    if not raw.strip():
        data: Any = {}
    else:
        ctype = request.content_type
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as Content-Type: application/json")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "malformed_json", "the body is not UTF-8") from None
        except (ValueError, RecursionError):
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}; "
                                             f"known: {', '.join(fields) or 'none'}")
    for name in required:
        if name not in data:
            raise ApiError(422, "invalid", f"missing field: {name}")
    for name, value in data.items():
        want = fields[name]
        # bool is an int in Python: never accept it for a number, or a number for a bool.
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in _types(want)):
            raise ApiError(422, "invalid", f"field {name}: expected {_names(want)}")
    return data


def _types(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _names(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", type(None): "null"}
    return " or ".join(names.get(x, x.__name__) for x in _types(t))


def query(request: web.Request, known: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters, refusing unknown or repeated ones."""
    q = request.rel_url.query
    unknown = sorted(set(q) - set(known))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown query parameter(s): {', '.join(unknown)[:200]}")
    out = {}
    for k in q:
        values = q.getall(k)
        if len(values) > 1:
            raise ApiError(422, "invalid", f"query parameter {k} given more than once")
        out[k] = values[0]
    return out


def flag(params: dict[str, str], name: str) -> bool:
    value = params.get(name, "false").lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise ApiError(422, "invalid", f"query parameter {name}: true or false")
