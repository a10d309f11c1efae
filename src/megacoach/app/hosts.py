"""Which Host names the labeling app answers, and which Origins may write to it (pure functions).

A browser page on another site can make a labeler's browser talk to the app by pointing its own host
name at the app's address (DNS rebinding); it cannot make the browser send the app's own name in the
Host header, nor the app's origin in the Origin header. So the app answers only the host names it is
reached by: the host of ``public_url`` (or, when no public URL is set, the local names ``localhost``,
``127.0.0.1`` and ``::1``) and every ``allowed_hosts`` entry. Writes from a browser must come from an allowed
origin: ``public_url`` itself, or an http(s) origin on an allowed host (and port, when the entry names
one); the request's own Host header is never the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HostRule:
    """An allowed host name, and its port when one is required (None: any port)."""

    name: str
    port: Optional[int] = None

    def matches(self, name: str, port: Optional[int]) -> bool:
        return name == self.name and (self.port is None or port == self.port)


@dataclass(frozen=True)
class HostPolicy:
    """The host names the app answers and the origins it takes writes from."""

    rules: tuple[HostRule, ...]
    public_origin: Optional[str] = None  # scheme://host[:port] of public_url, normalised

    def host_allowed(self, host_header: Optional[str]) -> bool:
        """True when the request's Host header names an allowed host (a missing or garbled one: False)."""
        parsed = split_host(host_header or "")
        return parsed is not None and any(r.matches(*parsed) for r in self.rules)

    def origin_allowed(self, origin: str) -> bool:
        """True when a browser's Origin header names the public URL or an http(s) origin on an allowed host."""
        norm = normalise_origin(origin)
        if norm is None:
            return False
        if norm == self.public_origin:
            return True
        parts = urlsplit(norm)
        name = (parts.hostname or "").lower()
        return any(r.matches(name, parts.port or _DEFAULT_PORTS[parts.scheme]) for r in self.rules)

    def describe(self) -> str:
        return ", ".join(r.name + (f":{r.port}" if r.port else "") for r in self.rules)


def split_host(value: str) -> Optional[tuple[str, Optional[int]]]:
    """``name[:port]`` (IPv6 in brackets) lower-cased, without a trailing dot; None when it is not a host."""
    value = value.strip().lower()
    if not value or any(ch.isspace() or ch in "/?#@\\" for ch in value):
        return None
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:
        return None
    name = (parts.hostname or "").rstrip(".")
    if not name:
        return None
    return name, port


def normalise_origin(origin: str) -> Optional[str]:
    """``scheme://host[:port]`` lower-cased, the default port dropped; None for anything else (``null``)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    name = parts.hostname.lower().rstrip(".")
    host = f"[{name}]" if ":" in name else name
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host += f":{port}"
    return f"{parts.scheme}://{host}"


def host_policy(public_url: Optional[str], allowed_hosts: tuple[str, ...]) -> HostPolicy:
    """The policy of the app's settings: public_url's host (without one: the local names) and
    ``allowed_hosts`` (``name`` or ``name:port``)."""
    rules: list[HostRule] = []
    public_origin = None
    if public_url:
        parts = urlsplit(public_url)
        public_origin = normalise_origin(f"{parts.scheme}://{parts.netloc}")
        rules.append(HostRule((parts.hostname or "").lower().rstrip("."), parts.port))
    for entry in allowed_hosts:
        parsed = split_host(entry)
        if parsed is not None:
            rules.append(HostRule(*parsed))
    if not public_url:
        rules.extend(HostRule(name) for name in LOCAL_HOSTS)
    return HostPolicy(tuple(dict.fromkeys(rules)), public_origin)
