"""Errors the labeling app turns into 4xx answers with one clear message (never a 500)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from starlette.exceptions import HTTPException


class AppError(Exception):
    """A request the app refuses: HTTP status and a message meant for the person or script."""

    status = 400
    retry_after: Optional[int] = None  # seconds, for 429/503: the answer's Retry-After header
    first_refusal: bool = True  # for throttled tries: the first one since the client's last failure

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadInput(AppError):
    status = 422


class NotLoggedIn(AppError):
    """No valid log-in. ``expired`` tells a stale session apart from none at all."""

    status = 401

    def __init__(self, message: str = "log in first", expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


class Forbidden(AppError):
    status = 403


class NotFound(AppError):
    status = 404


class Conflict(AppError):
    status = 409


class TooMany(AppError):
    status = 429


def retry_later(message: str, retry_after: int, status: int = 429) -> "HTTPException":
    """A 429/503 answer with a Retry-After header (the app's error handler keeps the header)."""
    from starlette.exceptions import HTTPException  # the web stack only when a request is refused

    return HTTPException(status, message, headers={"retry-after": str(max(1, int(retry_after)))})
