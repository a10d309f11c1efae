"""Errors the labeling app turns into 4xx answers with one clear message (never a 500)."""

from __future__ import annotations

from typing import Optional


class AppError(Exception):
    """A request the app refuses: HTTP status and a message meant for the person or script."""

    status = 400

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
