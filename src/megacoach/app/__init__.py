"""The human evaluators' labeling web app (FastAPI, server-rendered pages, a JSON API).

``create_app(db_url, settings)`` builds it; ``serve(db_url, host, port)`` runs it with uvicorn.
Imported lazily so that the light modules (``megacoach.app.cli``, which every ``megacoach`` command
loads) do not pull in the web stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve", "create_admin", "reset_password", "AppSettings"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from megacoach.app import server

        return getattr(server, name)
    if name in ("create_admin", "reset_password"):
        from megacoach.app import accounts

        return getattr(accounts, name)
    if name == "AppSettings":
        from megacoach.app.settings import AppSettings

        return AppSettings
    raise AttributeError(name)
