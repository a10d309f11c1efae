"""ASGI middleware: the Host allow-list, a request body limit (size and time), same-origin checks on writes,
and security headers."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional

import anyio

from megacoach.app.hosts import HostPolicy, host_policy

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


async def _refuse(scope: Scope, send: Send, status: int, message: str, close: bool = False) -> None:
    """A plain 4xx answer (JSON for /api and scripts, a short HTML page for browsers)."""
    path = scope.get("path", "")
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
    if path.startswith("/api/") or "text/html" not in accept:
        body = json.dumps({"detail": message}).encode()
        ctype = b"application/json"
    else:
        from markupsafe import escape

        body = (f"<!doctype html><meta charset=utf-8><title>{status}</title>"
                f"<h1>Request refused ({status})</h1><p>{escape(message)}</p><p><a href=\"/\">Home</a></p>").encode()
        ctype = b"text/html; charset=utf-8"
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the request is not read: the connection cannot carry another one
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413 (declared or streamed), and bodies that
    take longer than ``timeout_s`` to arrive with 408, before the app parses anything. The body is
    buffered (it is small) and replayed to the app. ``timeout_s`` None: the app's
    ``AppSettings.body_timeout_s`` (from ``scope["app"].state.mc``), else 30 s."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: Optional[float] = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _timeout(self, scope: Scope) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        try:
            return float(scope["app"].state.mc.settings.body_timeout_s)
        except (KeyError, AttributeError):
            return 30.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"request body too large: at most {self.max_bytes} bytes"
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await _refuse(scope, send, 413, too_big)
                    return
            except ValueError:
                await _refuse(scope, send, 400, "bad Content-Length header")
                return
        if scope.get("method") not in UNSAFE:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        timeout = self._timeout(scope)
        with anyio.move_on_after(timeout) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > self.max_bytes:
                    await _refuse(scope, send, 413, too_big, close=True)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            await _refuse(scope, send, 408, f"request body not received within {timeout:g} s", close=True)
            return
        data = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class AllowedHosts:
    """Answers only requests whose Host header names an allowed host (``hosts.HostPolicy``); any other
    (or none) gets 400 before routing, so a page on another site that rebinds its name to the app's
    address reaches nothing."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not self.policy.host_allowed(host):
                shown = host[:100] or "(none)"
                await _refuse(scope, send, 400, f"this server does not answer for host {shown}; it answers for "
                                                f"{self.policy.describe()} (megacoach label serve --public-url, "
                                                "--allowed-host)")
                return
        await self.app(scope, receive, send)


class SameOrigin:
    """Refuses cross-site writes: an unsafe method whose Origin is not one of the allowed origins
    (``hosts.HostPolicy.origin_allowed``: the public URL, or an allowed host; never compared with the
    request's own Host header), or whose Sec-Fetch-Site says another site. Requests without those
    headers (scripts, the trainer) pass; they still need a token or CSRF."""

    def __init__(self, app: ASGIApp, policy: Optional[HostPolicy] = None) -> None:
        self.app = app
        self.policy = policy or host_policy(None, ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in UNSAFE:
            headers = dict(scope.get("headers") or [])
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            origin = headers.get(b"origin", b"").decode("latin-1")
            if site == "cross-site":
                await _refuse(scope, send, 403, "cross-site request refused")
                return
            if origin and origin != "null":
                if not self.policy.origin_allowed(origin):
                    await _refuse(scope, send, 403, f"cross-origin request from {origin[:200]} refused")
                    return
            elif origin == "null":
                await _refuse(scope, send, 403, "request from an opaque origin refused")
                return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Adds CSP, no-sniff, frame and referrer headers to every response; no caching of pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {k.lower() for k, _ in headers}
                extra = [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                ]
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                headers += [(k, v) for k, v in extra if k not in present]
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_headers)
