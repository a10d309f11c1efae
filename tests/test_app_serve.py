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


def test_workers_get_time_to_start_on_a_busy_machine():
    """uvicorn's supervisor kills a worker that does not answer its health check in time (5 s by default),
    also while it starts: on a loaded machine every worker was killed and replaced forever."""
    import pytest

    from megacoach.errors import ConfigError

    config = server.ServerConfig("sqlite:///x.db", AppSettings(), server.ServerOptions(workers=2))
    assert config.timeout_worker_healthcheck == 60
    config = server.ServerConfig("sqlite:///x.db", AppSettings(), server.ServerOptions(workers=2, worker_healthcheck_s=9))
    assert config.timeout_worker_healthcheck == 9
    with pytest.raises(ConfigError, match="worker_healthcheck_s"):
        server.ServerOptions(worker_healthcheck_s=0)
