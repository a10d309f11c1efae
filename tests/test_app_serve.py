"""`megacoach label serve` runs uvicorn with the app's HTTP limits (the header deadline of app/httpguard.py)."""

from __future__ import annotations

import uvicorn

from megacoach.app import server
from megacoach.app.httpguard import GuardedH11Protocol
from megacoach.app.settings import AppSettings


def test_serve_passes_the_http_limits_to_uvicorn(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    settings = AppSettings.from_mapping({"header_timeout_s": 3.0, "keep_alive_timeout_s": 4.0})
    server.serve(f"sqlite:///{tmp_path / 'labels.db'}", "127.0.0.1", 8765, settings)
    assert seen["http"].func is GuardedH11Protocol and seen["http"].keywords["header_timeout_s"] == 3.0
    assert seen["timeout_keep_alive"] == 4.0 and seen["h11_max_incomplete_event_size"] == settings.max_header_bytes
