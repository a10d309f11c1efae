"""People and access: log-in sessions, invitations, API tokens, roles and permissions.

Who may do what (``PERMISSIONS``):
- ``label``        take items and submit labels/skips: labelers, admins, programs (mock labelers);
- ``andon``        pull the Andon cord: people (labelers and admins);
- ``read_labels``  read every label (export, the trainer's pulls): admins and programs (API tokens);
- ``adjudicate``   decide items whose labels disagree: adjudicators and admins;
- ``admin``        people, invitations, tokens, guidelines, audit log, dashboard: admins only.

An adjudicator is a labeler whom an admin allowed to decide disagreements (``labelers.adjudicator``):
their role is "adjudicator" here, "labeler" in the store.

An API token acts as its owner, limited to its scopes (``label``, ``read``, ``andon``, ``admin``),
until it expires. It belongs to a program account or to the person who minted it: nobody mints a
token for another person, so nobody labels in someone else's name. Labels record whether they came
through a log-in or a token (``comparisons.via``, ``api_token_id``).

Sessions and tokens are random secrets; only their SHA-256 is stored. Sessions end after
``session_ttl_s`` or ``session_idle_s`` without a request; every session has its own CSRF token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import unicodedata
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import anyio
import anyio.to_thread

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from megacoach.app.errors import AppError, BadInput, Conflict, Forbidden, NotFound, NotLoggedIn, TooMany
from megacoach.app.security import Passwords, hash_secret, new_api_token, new_secret, password_problem
from megacoach.app.settings import AppSettings
from megacoach.app.throttle import StoreLoginThrottle
from megacoach.labels.schema import ApiTokenRow, InvitationRow, LabelerRow, WebSessionRow, utcnow
from megacoach.labels.store import LabelStore

PERMISSIONS: dict[str, frozenset[str]] = {
    "label": frozenset({"admin", "labeler", "adjudicator", "program"}),
    "andon": frozenset({"admin", "labeler", "adjudicator"}),
    "read_labels": frozenset({"admin", "program"}),
    "adjudicate": frozenset({"admin", "adjudicator"}),
    "admin": frozenset({"admin"}),
}
# An API token's scopes: each grants one permission, and only as far as the owner's role has it.
SCOPES: dict[str, str] = {"label": "label", "read": "read_labels", "andon": "andon", "adjudicate": "adjudicate",
                          "admin": "admin"}


def app_role(row: Any) -> str:
    """A labeler row's (or record's) role in the app: "adjudicator" for a labeler allowed to decide
    disagreements, else the stored role."""
    return "adjudicator" if row.role == "labeler" and getattr(row, "adjudicator", False) else row.role
# An invitation's role; "adjudicator" makes a labeler with ``labelers.adjudicator`` set.
INVITABLE_ROLES = ("labeler", "adjudicator", "admin")
MAX_TOKEN_DAYS = 3650


def scopes_for_role(role: str) -> tuple[str, ...]:
    """The scopes an account of this role can hold (a new token's default)."""
    return tuple(sc for sc, perm in SCOPES.items() if role in PERMISSIONS[perm])


def parse_scopes(value: object) -> tuple[str, ...]:
    """Scopes from a list or a comma-separated string, validated, in SCOPES order."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise BadInput("scopes: expected a list of scopes")
    names = {str(x).strip() for x in items if str(x).strip()}
    unknown = names - set(SCOPES)
    if unknown:
        raise BadInput(f"scopes: unknown scope(s) {', '.join(sorted(unknown))}; expected some of {', '.join(SCOPES)}")
    return tuple(sc for sc in SCOPES if sc in names)
T = TypeVar("T")


@dataclass(frozen=True)
class Principal:
    """Who is making a request."""

    id: int
    name: str
    role: str  # admin | labeler | adjudicator | program
    kind: str  # person | program
    via: str  # session | token
    csrf: Optional[str] = None  # the session's CSRF token (sessions only)
    session_id: Optional[int] = None
    token_id: Optional[int] = None
    scopes: Optional[tuple[str, ...]] = None  # an API token's scopes (None for a log-in: the role decides)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" and self.can("admin")

    def can(self, permission: str) -> bool:
        if self.role not in PERMISSIONS[permission]:
            return False
        return self.scopes is None or any(SCOPES[sc] == permission for sc in self.scopes)

    def require(self, permission: str) -> "Principal":
        if self.role in PERMISSIONS[permission] and not self.can(permission):
            scope = next(sc for sc, perm in SCOPES.items() if perm == permission)
            raise Forbidden(f"{self.name}: this API token has no {scope!r} scope "
                            f"(it has: {', '.join(self.scopes or ()) or 'none'})")
        if not self.can(permission):
            what = {
                "admin": "admin pages and data are for admins only",
                "read_labels": "reading all labels needs an admin account or an API token",
                "andon": "only people can pull the Andon cord",
                "label": "this account cannot label",
                "adjudicate": "deciding disagreements is for adjudicators and admins",
            }[permission]
            raise Forbidden(f"{self.name} ({self.role}): {what}")
        return self


def clean_name(name: object, what: str = "name", max_chars: int = 200) -> str:
    """A display/account name: trimmed, 1..max_chars printable characters."""
    if not isinstance(name, str):
        raise BadInput(f"{what}: expected text")
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise BadInput(f"{what}: must not be empty")
    if len(name) > max_chars:
        raise BadInput(f"{what}: at most {max_chars} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise BadInput(f"{what}: control characters are not allowed")
    return name


class Auth:
    """Sessions, invitations and API tokens on top of the label store."""

    def __init__(self, store: LabelStore, settings: AppSettings, passwords: Optional[Passwords] = None) -> None:
        self.store = store
        self.settings = settings
        self.passwords = passwords or Passwords.from_settings(settings)
        # failed log-ins are counted in the store, so every server process (--workers N) sees them all
        self.throttle = StoreLoginThrottle(store, settings)
        self.hash_slots = HashSlots(settings.password_hash_concurrency, settings.password_hash_queue)

    # ----- passwords and log-in ---------------------------------------------------------------
    def check_throttle(self, name: str, client: str) -> None:
        """TooMany (with ``retry_after``) while this client must wait before trying this name again."""
        wait = self.throttle.retry_after(client, name)
        if wait:
            err = TooMany(f"too many failed log-ins from your address; try again in {wait} s")
            err.retry_after = wait
            err.first_refusal = self.throttle.refusal(client, name) == 1
            raise err

    def authenticate(self, name: str, password: str, client: str = "unknown") -> Principal:
        """The person with this name and password; AppError (401/429) otherwise. Costs one password
        verification whether or not the name exists (none while the client is throttled). The
        password is checked after the account's read has ended: no store session or transaction (nor
        its connection) is held while it is hashed."""
        self.check_throttle(name, client)
        with self.store.session(write=False) as s:
            row = s.scalar(select(LabelerRow).where(LabelerRow.name == name.strip()))
            stored = row.password_hash if row is not None else None
            person = row is not None and row.kind == "person" and bool(row.active)
            principal = Principal(row.id, row.name, app_role(row), row.kind, "session") if row is not None else None
        ok = self.passwords.verify(stored, password)
        if not ok or not person or principal is None:
            self.throttle.fail(client, name)
            raise AppError("wrong name or password (or the account is deactivated)", 401)
        if self.passwords.needs_rehash(stored or ""):
            self.store.update_labeler(principal.id, password_hash=self.passwords.hash(password))
        self.throttle.success(client, name)
        return principal

    async def authenticate_async(self, name: str, password: str, client: str = "unknown") -> Principal:
        """``authenticate`` in a worker thread, at most ``password_hash_concurrency`` at a time: a
        spray of log-ins neither blocks the event loop nor takes the threads labeling needs."""
        self.check_throttle(name, client)  # refused tries cost no thread and no hash
        return await self.hash_slots.run(self.authenticate, name, password, client)

    def change_password(self, who: Principal, current: str, new: str, client: str = "unknown") -> None:
        """A logged-in person changes their own password: the current one is checked (throttled
        like a log-in). Their other log-ins end; this one stays."""
        self.check_throttle(who.name, client)
        with self.store.session(write=False) as s:
            row = s.get(LabelerRow, who.id)
            stored = row.password_hash if row is not None and row.kind == "person" else None
        if not self.passwords.verify(stored, current):
            self.throttle.fail(client, who.name)
            raise Forbidden("your current password is not right")
        if new == current:
            raise BadInput("the new password must differ from the current one")
        problem = password_problem(new, who.name, self.settings.min_password_chars)
        if problem:
            raise BadInput(problem)
        self.store.update_labeler(who.id, password_hash=self.passwords.hash(new))
        with self.store.session() as s, s.begin():
            s.execute(delete(WebSessionRow).where(WebSessionRow.labeler_id == who.id,
                                                  WebSessionRow.id != (who.session_id or -1)))

    async def change_password_async(self, who: Principal, current: str, new: str, client: str = "unknown") -> None:
        self.check_throttle(who.name, client)
        await self.hash_slots.run(self.change_password, who, current, new, client)

    def start_session(self, who: Principal) -> tuple[str, Principal]:
        """A new log-in for ``who``: the cookie value (secret) and the principal with its CSRF token."""
        secret = new_secret()
        csrf = new_secret()
        now = utcnow()
        with self.store.session() as s, s.begin():
            # Expired sessions of this person are dropped on the way.
            s.execute(delete(WebSessionRow).where(WebSessionRow.labeler_id == who.id, WebSessionRow.expires_at <= now))
            row = WebSessionRow(
                token_hash=hash_secret(secret),
                labeler_id=who.id,
                csrf_token=csrf,
                created_at=now,
                last_seen_at=now,
                expires_at=now + dt.timedelta(seconds=self.settings.session_ttl_s),
            )
            s.add(row)
            s.flush()
            sid = row.id
        return secret, Principal(who.id, who.name, who.role, who.kind, "session", csrf=csrf, session_id=sid)

    def resolve_session(self, secret: str) -> Principal:
        """The principal of a session cookie; NotLoggedIn(expired=True) when it ended."""
        if not secret or len(secret) > 200:
            raise NotLoggedIn("your session has ended; log in again", expired=True)
        now = utcnow()
        with self.store.session(write=False) as s:
            found = s.execute(
                select(WebSessionRow, LabelerRow)
                .join(LabelerRow, LabelerRow.id == WebSessionRow.labeler_id)
                .where(WebSessionRow.token_hash == hash_secret(secret))
            ).first()
            if found is None:
                raise NotLoggedIn("your session has ended (logged out or expired); log in again", expired=True)
            sess, lab = found
            idle = (now - sess.last_seen_at).total_seconds()
            expired = sess.expires_at <= now or idle > self.settings.session_idle_s
            principal = Principal(lab.id, lab.name, app_role(lab), lab.kind, "session", csrf=sess.csrf_token,
                                  session_id=sess.id)
            active = bool(lab.active)
            touch = idle > 60
        if expired or not active:
            self.end_session(principal.session_id)
            if not active:
                raise NotLoggedIn("this account is deactivated", expired=True)
            raise NotLoggedIn("your session expired; log in again", expired=True)
        if touch:
            with self.store.session() as s, s.begin():
                s.execute(
                    WebSessionRow.__table__.update()
                    .where(WebSessionRow.id == principal.session_id)
                    .values(last_seen_at=now)
                )
        return principal

    def end_session(self, session_id: Optional[int]) -> None:
        if session_id is None:
            return
        with self.store.session() as s, s.begin():
            s.execute(delete(WebSessionRow).where(WebSessionRow.id == session_id))

    def end_all_sessions(self, labeler_id: int) -> None:
        with self.store.session() as s, s.begin():
            s.execute(delete(WebSessionRow).where(WebSessionRow.labeler_id == labeler_id))

    # ----- API tokens --------------------------------------------------------------------------
    def resolve_token(self, raw: str) -> Principal:
        """The principal of an API token: its owner, limited to the token's scopes."""
        if not raw or len(raw) > 200:
            raise NotLoggedIn("API token missing or malformed (Authorization: Bearer <token>)")
        now = utcnow()
        with self.store.session(write=False) as s:
            found = s.execute(
                select(ApiTokenRow, LabelerRow)
                .join(LabelerRow, LabelerRow.id == ApiTokenRow.labeler_id)
                .where(ApiTokenRow.token_hash == hash_secret(raw))
            ).first()
            if found is None:
                raise NotLoggedIn("API token unknown")
            tok, lab = found
            if tok.revoked_at is not None:
                raise NotLoggedIn("API token revoked")
            if tok.expires_at is None or tok.expires_at <= now:
                when = tok.expires_at.strftime("%Y-%m-%d %H:%M UTC") if tok.expires_at else "(no expiry set)"
                raise NotLoggedIn(f"API token expired {when}; ask an admin for a new one")
            if not lab.active:
                raise NotLoggedIn(f"API token owner {lab.name!r} is deactivated")
            principal = Principal(lab.id, lab.name, app_role(lab), lab.kind, "token", token_id=tok.id,
                                  scopes=tuple(sc for sc in tok.scopes.split(",") if sc in SCOPES))
            touch = tok.last_used_at is None or (now - tok.last_used_at).total_seconds() > 60
        if touch:
            with self.store.session() as s, s.begin():
                s.execute(ApiTokenRow.__table__.update().where(ApiTokenRow.id == principal.token_id).values(last_used_at=now))
        return principal

    def create_api_token(self, owner: str, token_name: str, *, by: Optional[Principal] = None,
                         scopes: Optional[object] = None, days: Optional[int] = None,
                         minted_by: Optional[str] = None) -> tuple[str, dict]:
        """A new API token for account ``owner`` (shown once) and its info.

        A token acts as its owner, so it is only for a program account (a missing name is created
        as one: the trainer, scripts, mock labelers) or for the person minting it (``by``); nobody
        mints a token for another person. ``scopes`` (default: all the owner's role allows) may not
        exceed the owner's role, nor the minting token's own scopes. ``days``: lifetime (default
        ``api_token_days``). ``by`` None means the shell (``megacoach label token``): programs only."""
        owner = clean_name(owner, "account")
        token_name = clean_name(token_name or owner, "token name")
        if days is None:
            days = self.settings.api_token_days
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_TOKEN_DAYS:
            raise BadInput(f"days: expected a whole number of days 1..{MAX_TOKEN_DAYS}, got {days!r}")
        existing = self.store.get_labeler(owner)
        if existing is not None and existing.kind == "person" and (by is None or by.id != existing.id):
            raise Forbidden(f"account {owner!r} is a person: an API token acts as its owner, so only {owner} may mint "
                            "one for themselves; tokens for scripts and the trainer belong to program accounts")
        if existing is None:
            existing = self.store.get_or_create_labeler(owner, kind="program")
        if not existing.active:
            raise Conflict(f"account {owner!r} is deactivated")
        allowed = scopes_for_role(app_role(existing))
        chosen = allowed if scopes is None else parse_scopes(scopes)
        if not chosen:
            raise BadInput("scopes: a token needs at least one scope")
        beyond = [sc for sc in chosen if sc not in allowed]
        if beyond:
            raise BadInput(f"scopes: account {owner!r} ({existing.role}) cannot have {', '.join(beyond)}; "
                           f"it can have {', '.join(allowed)}")
        if by is not None and by.scopes is not None:
            if scopes is None:
                chosen = tuple(sc for sc in chosen if sc in by.scopes)
            if any(sc not in by.scopes for sc in chosen):
                raise Forbidden("scopes: a token cannot mint a token with scopes it does not have")
        raw = new_api_token()
        now = utcnow()
        creator = minted_by or (by.name if by is not None else "")
        with self.store.session() as s, s.begin():
            row = ApiTokenRow(token_hash=hash_secret(raw), name=token_name, labeler_id=existing.id, created_at=now,
                              scopes=",".join(chosen), expires_at=now + dt.timedelta(days=days), created_by=creator)
            s.add(row)
            s.flush()
            info = dict(id=row.id, name=token_name, owner=existing.name, role=existing.role, scopes=list(chosen),
                        expires_at=row.expires_at, created_by=creator)
        return raw, info

    def revoke_api_token(self, token_id: int) -> dict:
        with self.store.session() as s, s.begin():
            row = s.get(ApiTokenRow, token_id)
            if row is None:
                raise NotFound(f"API token {token_id}: no such token")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return dict(id=row.id, name=row.name)

    def api_tokens(self) -> list[dict]:
        with self.store.session(write=False) as s:
            rows = s.execute(
                select(ApiTokenRow, LabelerRow.name).join(LabelerRow, LabelerRow.id == ApiTokenRow.labeler_id)
                .order_by(ApiTokenRow.id)
            ).all()
            now = utcnow()
            return [
                dict(id=t.id, name=t.name, owner=owner, created_at=t.created_at, last_used_at=t.last_used_at,
                     revoked=t.revoked_at is not None, scopes=[sc for sc in t.scopes.split(",") if sc],
                     expires_at=t.expires_at, expired=t.expires_at is None or t.expires_at <= now,
                     created_by=t.created_by)
                for t, owner in rows
            ]

    # ----- invitations -------------------------------------------------------------------------
    def create_invitation(self, name: str, role: str, created_by: str) -> tuple[str, dict]:
        """An invitation for a new person; returns the secret token (for the link) and its info."""
        name = clean_name(name)
        if role not in INVITABLE_ROLES:
            raise BadInput(f"role: expected one of {', '.join(INVITABLE_ROLES)}, got {role!r}")
        if self.store.get_labeler(name) is not None:
            raise Conflict(f"an account called {name!r} already exists")
        raw = new_secret()
        now = utcnow()
        with self.store.session() as s, s.begin():
            row = InvitationRow(token_hash=hash_secret(raw), name=name, role=role, created_by=created_by,
                                created_at=now, expires_at=now + dt.timedelta(seconds=self.settings.invite_ttl_s))
            s.add(row)
            s.flush()
            info = dict(id=row.id, name=name, role=role, expires_at=row.expires_at)
        return raw, info

    def invitation(self, raw: str) -> dict:
        """The open invitation behind a link; 404 unknown, 410 used or expired."""
        with self.store.session(write=False) as s:
            row = s.scalar(select(InvitationRow).where(InvitationRow.token_hash == hash_secret(raw or "")))
            if row is None:
                raise NotFound("this invitation link is not valid (mistyped, or never issued)")
            if row.used_at is not None:
                raise AppError("this invitation was already used; log in instead", 410)
            if row.expires_at <= utcnow():
                raise AppError("this invitation expired; ask an admin for a new one", 410)
            return dict(id=row.id, name=row.name, role=row.role, expires_at=row.expires_at)

    def accept_invitation(self, raw: str, password: str) -> Principal:
        """Create the invited person's account with this password (the invitation is used up)."""
        info = self.invitation(raw)
        problem = password_problem(password, info["name"], self.settings.min_password_chars)
        if problem:
            raise BadInput(problem)
        pw_hash = self.passwords.hash(password)
        now = utcnow()
        try:
            with self.store.session() as s, s.begin():
                row = s.get(InvitationRow, info["id"])
                if row is None or row.used_at is not None:
                    raise AppError("this invitation was already used; log in instead", 410)
                if s.scalar(select(LabelerRow.id).where(LabelerRow.name == row.name)) is not None:
                    raise Conflict(f"an account called {row.name!r} already exists")
                lab = LabelerRow(name=row.name, kind="person", role="admin" if row.role == "admin" else "labeler",
                                 adjudicator=row.role == "adjudicator", password_hash=pw_hash, active=True)
                s.add(lab)
                s.flush()
                row.used_at = now
                row.labeler_id = lab.id
                principal = Principal(lab.id, lab.name, app_role(lab), lab.kind, "session")
        except IntegrityError:
            raise Conflict(f"an account called {info['name']!r} already exists") from None
        return principal

    def invitations(self) -> list[dict]:
        with self.store.session(write=False) as s:
            rows = s.scalars(select(InvitationRow).order_by(InvitationRow.id.desc()).limit(200)).all()
            now = utcnow()
            return [
                dict(id=r.id, name=r.name, role=r.role, created_by=r.created_by, created_at=r.created_at,
                     state="used" if r.used_at else ("expired" if r.expires_at <= now else "open"))
                for r in rows
            ]

    def admin_exists(self) -> bool:
        with self.store.session(write=False) as s:
            n = s.scalar(select(func.count(LabelerRow.id)).where(
                LabelerRow.role == "admin", LabelerRow.active, LabelerRow.password_hash.is_not(None)))
            return bool(n)

    def set_password(self, name: str, password: str) -> None:
        problem = password_problem(password, name, self.settings.min_password_chars)
        if problem:
            raise BadInput(problem)
        self.store.update_labeler(name, password_hash=self.passwords.hash(password))


class HashSlots:
    """Runs password hashing in worker threads, ``concurrency`` at a time, with at most ``queue``
    callers waiting; beyond that the caller gets 503 at once ("busy, try again"). Waiting callers
    hold no thread. One limiter per event loop (a server process has one)."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._pending = 0
        self._limiters: "weakref.WeakKeyDictionary[object, anyio.CapacityLimiter]" = weakref.WeakKeyDictionary()

    def _limiter(self) -> "anyio.CapacityLimiter":
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(self.concurrency)
        return limiter

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pending >= self.concurrency + self.queue:
            err = AppError("the server is busy checking passwords; try again in a moment", 503)
            err.retry_after = 1
            raise err
        self._pending += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter())
        finally:
            self._pending -= 1
