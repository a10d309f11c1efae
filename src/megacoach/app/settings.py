"""Settings of the human evaluators' labeling app (one frozen, validated object)."""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megacoach.errors import ConfigError


class AppSettings(BaseModel):
    """Every knob of the labeling app. Defaults suit a small team on one machine.

    Times are in seconds. The argon2 costs are the OWASP-recommended minimums by default;
    tests lower them to stay fast.

    Log-in throttling (counted in the label store, shared by every server process): failures are
    counted per client address and per client address + account name. The first ``login_free_failures`` failures of one
    client for one name (``login_client_free_failures`` for one client over all names) cost
    nothing more than the password check; after that the client must wait ``login_backoff_s``,
    doubling with every further failure up to ``login_backoff_max_s``, before it may try again
    (429 with Retry-After). No account is ever locked: the right password from another client
    always gets in. A client's failures are forgotten ``login_forget_s`` after its last one.

    Host names: the app answers requests for ``public_url``'s host and ``allowed_hosts`` (without a
    ``public_url``: also localhost, 127.0.0.1 and ::1), any other Host gets 400; a browser's write must
    come from one of these origins (``megacoach.app.hosts``).

    HTTP limits: ``max_body_bytes`` and ``body_timeout_s`` are enforced by the app's middleware;
    ``header_timeout_s``, ``keep_alive_timeout_s`` and ``max_header_bytes`` by the HTTP server
    (``megacoach.app.httpguard.uvicorn_options`` turns them into uvicorn's options).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    secure_cookies: bool = False  # set True behind HTTPS: cookies get the Secure flag
    session_ttl_s: int = Field(12 * 3600, ge=60)  # absolute lifetime of a log-in
    session_idle_s: int = Field(2 * 3600, ge=60)  # log-in ends after this long without a request
    invite_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    lock_timeout_s: int = Field(15 * 60, ge=5)  # an assigned item is held this long for its labeler
    too_fast_s: float = Field(3.0, ge=0.0)  # labels faster than this are marked too_fast
    overlap: int = Field(1, ge=1, le=50)  # minimum labels per ordinary item (items.overlap may ask more)
    andon_pulls_to_pause: int = Field(1, ge=1, le=1000)  # distinct labelers whose pull pauses training
    # a person's pull counts once per run within this window; repeats answer "already pulled" (audited)
    andon_repeat_window_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    # Andon requests per client address per minute (counted or not); beyond: 429 with Retry-After
    andon_rate_per_min: int = Field(6, ge=1, le=10_000)
    run_id: Optional[str] = None  # the training run the app watches; default: most recently updated
    item_sources: Optional[tuple[str, ...]] = None  # serve only items of these sources (None: every item)
    max_body_bytes: int = Field(256 * 1024, ge=1024)  # larger request bodies get 413
    body_timeout_s: float = Field(30.0, gt=0, le=3600)  # a request body must arrive within this (else 408)
    header_timeout_s: float = Field(10.0, gt=0, le=600)  # request headers must arrive within this (server)
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=600)  # an idle kept-alive connection closes (server)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)  # request line + headers (server)
    max_text_chars: int = Field(2000, ge=10)  # notes, reasons, names
    max_guideline_chars: int = Field(100_000, ge=100)
    min_password_chars: int = Field(10, ge=8)
    login_free_failures: int = Field(5, ge=1, le=1000)  # per client address + account name
    login_client_free_failures: int = Field(20, ge=1, le=100_000)  # per client address, all names
    login_backoff_s: float = Field(1.0, gt=0, le=3600)  # first wait after the free failures; doubles
    login_backoff_max_s: float = Field(15 * 60, gt=0, le=24 * 3600)
    login_forget_s: int = Field(3600, ge=1)  # a client's failures are forgotten this long after the last
    login_throttle_entries: int = Field(100_000, ge=10, le=10_000_000)  # rows kept per table (client, pair)
    # password hashes computed at once (threads) and log-ins waiting for one (beyond: 503), for the whole
    # server: `serve --workers N` gives each worker an even share (at least one check at a time)
    password_hash_concurrency: int = Field(2, ge=1, le=64)
    password_hash_queue: int = Field(64, ge=0, le=100_000)
    # peers whose X-Forwarded-For names the client (a reverse proxy); by default the peer itself is the client
    trusted_proxies: tuple[str, ...] = ()
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=8)
    argon2_parallelism: int = Field(1, ge=1)
    api_token_days: int = Field(90, ge=1, le=3650)  # default lifetime of a new API token
    skip_reasons: tuple[str, ...] = (
        "cannot judge: continuations are all equally bad",
        "cannot judge: I do not understand the prompt",
        "offensive or unsafe content",
        "technical problem (text garbled, empty, duplicated)",
    )
    # where people reach the app, e.g. https://label.example.org: the base of invitation links.
    # Unset: links are printed as paths (/invite/...) to put after the address people use.
    # The request's Host header is never used for links.
    public_url: Optional[str] = None
    # further host names (or name:port) people reach the app by: the app answers only these, public_url's
    # host and, without a public_url, localhost / 127.0.0.1 / ::1 (any other Host: 400, before routing)
    allowed_hosts: tuple[str, ...] = ()

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from megacoach.app.hosts import split_host

        for entry in v:
            if split_host(entry) is None or "://" in entry:
                raise ValueError(f"{entry!r} is not a host name or name:port (e.g. label.example.org)")
        return tuple(e.strip().lower() for e in v)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        v = v.strip()
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http(s) URL such as https://label.example.org")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("a base URL has no query, fragment or user name")
        if any(ch.isspace() for ch in v):
            raise ValueError("must not contain spaces")
        return v.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for addr in v:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"{addr!r} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _check_login_times(self) -> "AppSettings":
        if self.login_forget_s < self.login_backoff_max_s:
            raise ValueError(f"login_forget_s ({self.login_forget_s}) must be at least login_backoff_max_s "
                             f"({self.login_backoff_max_s}): a client would be forgotten while it waits")
        return self

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]] = None) -> "AppSettings":
        """Build settings from a plain mapping; a bad field raises ConfigError naming it."""
        try:
            return cls(**dict(values or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            raise ConfigError(f"label app setting {field!r}: {first.get('msg')}") from None
