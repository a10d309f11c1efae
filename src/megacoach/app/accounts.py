"""Accounts from the shell: ``megacoach label create-admin`` and ``megacoach label reset-password``.

``create_admin`` makes a new admin account (or sets the password of an existing admin); it never
changes an existing account's role: a labeler's name is refused. ``reset_password`` sets a
person's password and keeps their role; their log-ins end. Both are audited.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from megacoach.app.auth import Auth, clean_name
from megacoach.app.errors import AppError
from megacoach.app.security import password_problem
from megacoach.app.settings import AppSettings
from megacoach.errors import ConfigError, DataError
from megacoach.labels.store import LabelStore

SettingsLike = Union[AppSettings, Mapping[str, Any], None]


def _settings(settings: SettingsLike) -> AppSettings:
    return settings if isinstance(settings, AppSettings) else AppSettings.from_mapping(settings)


def _checked(name: str, password: str, cfg: AppSettings, what: str) -> str:
    try:
        name = clean_name(name, f"{what} name")
    except AppError as e:
        raise ConfigError(e.message) from None
    problem = password_problem(password, name, cfg.min_password_chars)
    if problem:
        raise ConfigError(f"{what} password: {problem}")
    return name


def create_admin(db_url: Optional[str], name: str, password: str, settings: SettingsLike = None) -> int:
    """Create an admin account (or set an existing admin's password); returns its id. An existing
    labeler or program of that name is refused (DataError): this never promotes anyone."""
    cfg = _settings(settings)
    name = _checked(name, password, cfg, "admin")
    with LabelStore(db_url) as store:
        auth = Auth(store, cfg)
        existing = store.get_labeler(name)
        if existing is not None and existing.role != "admin":
            raise DataError(f"create-admin {name!r}: that account exists and is a {existing.role}; create-admin "
                            f"never changes a role (to set its password: megacoach label reset-password {name})")
        pw_hash = auth.passwords.hash(password)
        if existing is None:
            rec = store.get_or_create_labeler(name, kind="person", role="admin", password_hash=pw_hash)
            if rec.role != "admin":  # created a moment ago by someone else
                raise DataError(f"create-admin {name!r}: that account exists and is a {rec.role}")
            store.append_audit("megacoach label create-admin", "create_admin", dict(name=name))
        else:
            rec = store.update_labeler(existing.id, active=True, password_hash=pw_hash)
            auth.end_all_sessions(rec.id)
            store.append_audit("megacoach label create-admin", "password_reset", dict(name=name, role=rec.role))
        return rec.id


def reset_password(db_url: Optional[str], name: str, password: str, settings: SettingsLike = None) -> str:
    """Set a person's password (their role stays); their log-ins end. Returns the role."""
    cfg = _settings(settings)
    name = _checked(name, password, cfg, "new")
    with LabelStore(db_url) as store:
        auth = Auth(store, cfg)
        existing = store.get_labeler(name)
        if existing is None:
            raise DataError(f"reset-password {name!r}: no such account")
        if existing.kind != "person":
            raise DataError(f"reset-password {name!r}: a program account has no password (it uses API tokens)")
        rec = store.update_labeler(existing.id, password_hash=auth.passwords.hash(password))
        auth.end_all_sessions(rec.id)
        store.append_audit("megacoach label reset-password", "password_reset", dict(name=name, role=rec.role))
        return rec.role
