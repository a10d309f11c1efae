"""Settings of the human evaluators' labeling app (one frozen, validated object)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megacoach.errors import ConfigError


class AppSettings(BaseModel):
    """Every knob of the labeling app. Defaults suit a small team on one machine.

    Times are in seconds. The argon2 costs are the OWASP-recommended minimums by default;
    tests lower them to stay fast.
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
    run_id: Optional[str] = None  # the training run the app watches; default: most recently updated
    item_sources: Optional[tuple[str, ...]] = None  # serve only items of these sources (None: every item)
    max_body_bytes: int = Field(256 * 1024, ge=1024)  # larger request bodies get 413
    max_text_chars: int = Field(2000, ge=10)  # notes, reasons, names
    max_guideline_chars: int = Field(100_000, ge=100)
    min_password_chars: int = Field(10, ge=8)
    login_failures_before_lock: int = Field(10, ge=1)  # per account name, within login_lock_s
    login_lock_s: int = Field(15 * 60, ge=1)
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=8)
    argon2_parallelism: int = Field(1, ge=1)
    skip_reasons: tuple[str, ...] = (
        "cannot judge: continuations are all equally bad",
        "cannot judge: I do not understand the prompt",
        "offensive or unsafe content",
        "technical problem (text garbled, empty, duplicated)",
    )
    public_url: Optional[str] = None  # used to print invite links; default http://host:port

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]] = None) -> "AppSettings":
        """Build settings from a plain mapping; a bad field raises ConfigError naming it."""
        try:
            return cls(**dict(values or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            raise ConfigError(f"label app setting {field!r}: {first.get('msg')}") from None
