"""HTTP server limits for the labeling app: slow clients and oversized request heads are cut off.

uvicorn bounds an idle kept-alive connection (``timeout_keep_alive``) but not the time a client may
take to send its request headers: a client that sends one header line a minute keeps its connection,
and a slot, open forever. And its head limit (h11's ``max_incomplete_event_size``) only counts a head
that is still incomplete: a head of any size that arrives whole in one read passes. ``GuardedH11Protocol``
is uvicorn's h11 protocol with

- a deadline: the request line and headers must arrive within ``header_timeout_s`` of the connection
  opening (or of the first byte of the next request on a kept-alive connection); otherwise the server
  answers 408 and closes;
- a size limit on the complete head: before h11 parses a request's head, the bytes up to its blank line
  (or all the bytes buffered, while it has none) are counted, whatever the socket reads delivered and
  for pipelined requests too; beyond ``max_header_bytes`` the server answers 400 and closes, as uvicorn
  does for a head h11 refuses.
The body's deadline (``body_timeout_s``) and size (``max_body_bytes``) are the app's own
middleware (``megacoach.app.middleware.BodyLimit``).

Serve with ``uvicorn.run(app, ..., **uvicorn_options(settings))``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any, Callable, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from megacoach.app.settings import AppSettings

log = logging.getLogger("megacoach.app")

_TIMEOUT_BODY = b"request headers not received in time\r\n"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n"
                     + _TIMEOUT_BODY)


_END_OF_HEAD = re.compile(b"\n\r?\n")  # the blank line that ends a request head (as h11 finds it)


def head_size(buffered: bytes) -> int:
    """The bytes of the request head at the start of ``buffered``: up to and with its blank line, or
    all of them when the head is not complete yet."""
    end = _END_OF_HEAD.search(buffered)
    return end.end() if end is not None else len(buffered)


def limit_heads(conn: h11.Connection, max_bytes: int) -> None:
    """Make ``conn.next_event`` refuse (h11.RemoteProtocolError, which uvicorn answers with 400 and a
    close) a request head larger than ``max_bytes``, counted on the complete head before h11 parses it."""
    parse: Callable[[], Any] = conn.next_event

    def next_event() -> Any:
        if conn.their_state is h11.IDLE:  # the next thing to parse is a request head
            size = head_size(conn.trailing_data[0])
            if size > max_bytes:
                raise h11.RemoteProtocolError(f"request head of {size} bytes or more: at most {max_bytes}",
                                              error_status_hint=431)
        return parse()

    conn.next_event = next_event  # type: ignore[method-assign]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers, and a size limit on
    the complete request head (``max_header_bytes``; None: uvicorn's ``h11_max_incomplete_event_size``)."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, max_header_bytes: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: Optional[asyncio.TimerHandle] = None
        limit = max_header_bytes if max_header_bytes is not None else self.config.h11_max_incomplete_event_size
        if limit is not None:
            limit_heads(self.conn, limit)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the request's head is complete

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        log.info("closed a connection from %s: request headers not complete within %.1f s",
                 self.client[0] if self.client else "unknown", self.header_timeout_s)
        try:
            self.transport.write(_TIMEOUT_RESPONSE)
        finally:
            self.transport.close()


def uvicorn_options(settings: AppSettings) -> dict[str, Any]:
    """uvicorn's options for the app's HTTP limits: the guarded protocol (header deadline, the largest
    complete request head), the keep-alive timeout and the largest incomplete head."""
    return dict(
        http=functools.partial(GuardedH11Protocol, header_timeout_s=settings.header_timeout_s,
                               max_header_bytes=settings.max_header_bytes),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
