"""The HTTP API (`/api/v1/`): JSON over the operations layer, bearer API keys, an OpenAPI 3.1
document. `make_api_app(ops)` is an aiohttp sub-application, mounted by the web admin's app
with `app.add_subapp("/api/v1/", make_api_app(ops))`, or run on its own (tests)."""
from __future__ import annotations

from .app import AuthFailures, make_api_app
from .openapi import SPEC

__all__ = ["make_api_app", "AuthFailures", "SPEC"]
