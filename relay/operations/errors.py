"""The operations layer's one error: a stable code, a human message, the HTTP status it maps to.

It is a `StoreError`, so the CLI prints it as it always printed a store's refusal (one line,
exit 1), and the web pages and the API map `code`/`status` without parsing text.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from ..credentials import StoreError
from ..store.contract import StoreUnavailable

STATUS = {
    "invalid": 422,            # the input is not acceptable (bad name, weak password, unknown filter)
    "not_found": 404,
    "conflict": 409,           # already exists, still in use, already revoked
    "credential_limit": 409,   # the per-domain cap (credentials.per_domain)
    "unavailable": 503,        # the store is busy or full: try again
}


class OperationError(StoreError):
    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message, code)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 400)

    def __repr__(self) -> str:
        return f"OperationError({self.code!r}, {self.message!r}, {self.status})"


def not_found(message: str) -> OperationError:
    return OperationError("not_found", message)


def invalid(message: str) -> OperationError:
    return OperationError("invalid", message)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Store refusals and failures, as OperationError."""
    try:
        yield
    except OperationError:
        raise
    except StoreError as exc:
        raise OperationError(exc.code, str(exc)) from None
    except StoreUnavailable as exc:
        raise OperationError("unavailable", f"the store is busy or full, try again ({exc})") from None
