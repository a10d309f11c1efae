"""Pure security helpers: password hashing (argon2id), random tokens, token hashing, CSRF checks.

Secrets (session ids, invitation and API tokens) are random 256-bit values; only their SHA-256
is stored, so a copy of the database does not let anyone log in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from megacoach.app.settings import AppSettings

API_TOKEN_PREFIX = "mct_"


def new_secret() -> str:
    """A fresh URL-safe random secret (32 bytes of entropy)."""
    return secrets.token_urlsafe(32)


def new_api_token() -> str:
    """A fresh API token; the prefix lets secret scanners and people recognise it."""
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (sessions, invitations, API tokens): what the store keeps."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def same_secret(a: str | None, b: str | None) -> bool:
    """Constant-time equality; False when either side is missing or empty."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


@dataclass
class Passwords:
    """argon2id password hashing with the app's cost settings.

    A check for an account without a password (an unknown name, a program) verifies against a
    dummy hash of the same cost, computed once: every log-in costs exactly one verification, so
    the answer time does not tell known names from unknown ones."""

    hasher: PasswordHasher
    _dummy: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        key = self._key()
        with _DUMMY_LOCK:
            if key not in _DUMMY_HASHES:
                _DUMMY_HASHES[key] = self.hasher.hash(secrets.token_urlsafe(16))
            self._dummy = _DUMMY_HASHES[key]

    @classmethod
    def from_settings(cls, settings: AppSettings) -> "Passwords":
        return cls(
            PasswordHasher(
                time_cost=settings.argon2_time_cost,
                memory_cost=settings.argon2_memory_kib,
                parallelism=settings.argon2_parallelism,
            )
        )

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        """True when the password matches. Without a stored hash: one verification of the dummy."""
        try:
            if not password_hash:
                self.hasher.verify(self._dummy, password)
                return False
            return self.hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _key(self) -> tuple[int, int, int]:
        return (self.hasher.time_cost, self.hasher.memory_cost, self.hasher.parallelism)


_DUMMY_HASHES: dict[tuple[int, int, int], str] = {}
_DUMMY_LOCK = threading.Lock()


def password_problem(password: str, name: str, min_chars: int) -> str | None:
    """Why a new password is refused, or None when it is acceptable."""
    if len(password) < min_chars:
        return f"password must have at least {min_chars} characters"
    if len(password) > 1024:
        return "password must have at most 1024 characters"
    if password.strip().lower() == name.strip().lower():
        return "password must differ from the account name"
    if len(set(password)) < 4:
        return "password is too repetitive"
    return None
