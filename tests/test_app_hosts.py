"""The labeling app answers only its own host names and takes browser writes only from its own origins
(app/hosts.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from test_app_support import csrf_of, login, make_world


# ----- the Host allow-list -------------------------------------------------------------------------

def test_host_policy_defaults_to_local_names_and_follows_the_public_url():
    from megacoach.app.hosts import host_policy

    local = host_policy(None, ())
    for ok in ("localhost", "127.0.0.1:8000", "LOCALHOST:1", "[::1]:8000", "localhost."):
        assert local.host_allowed(ok), ok
    for bad in ("evil.example", "evil.example:8000", "", None, "127.0.0.1.evil.example", "a b", "x@127.0.0.1"):
        assert not local.host_allowed(bad), bad
    public = host_policy("http://127.0.0.1:8123", ())
    assert public.host_allowed("127.0.0.1:8123")
    assert not public.host_allowed("127.0.0.1:9999") and not public.host_allowed("localhost:8123")
    assert not public.host_allowed("evil.example:8123")
    both = host_policy("https://label.example.org", ("lab.internal", "10.0.0.5:8000"))
    assert both.host_allowed("label.example.org") and both.host_allowed("label.example.org:443")
    assert both.host_allowed("lab.internal:1234") and both.host_allowed("10.0.0.5:8000")
    assert not both.host_allowed("10.0.0.5:8001") and not both.host_allowed("localhost")
    # origins: the public URL itself, or an http(s) origin on an allowed host (and port)
    assert both.origin_allowed("https://label.example.org") and both.origin_allowed("https://label.example.org:443")
    assert both.origin_allowed("http://lab.internal:8080") and both.origin_allowed("http://10.0.0.5:8000")
    assert not both.origin_allowed("http://10.0.0.5") and not both.origin_allowed("https://evil.example")
    assert not both.origin_allowed("null") and not both.origin_allowed("ftp://label.example.org")
    assert public.origin_allowed("http://127.0.0.1:8123") and not public.origin_allowed("http://127.0.0.1:8124")
    assert not public.origin_allowed("http://evil.example:8123")
    assert local.origin_allowed("http://localhost:8000") and not local.origin_allowed("http://evil.example:8000")


def test_other_hosts_get_400_before_routing(tmp_path):
    w = make_world(tmp_path, public_url="http://127.0.0.1:8123", allowed_hosts=("testserver",))
    c = TestClient(w.app)
    for path in ("/login", "/api/health", "/no/such/page", "/static/label.js"):
        r = c.get(path, headers={"host": "evil.example"})
        assert r.status_code == 400 and "evil.example" in r.json()["detail"], (path, r.text)
        r = c.get(path, headers={"host": "evil.example:8123"})
        assert r.status_code == 400, path
    assert c.get("/api/health", headers={"host": "127.0.0.1:8123"}).status_code == 200
    assert c.get("/api/health").status_code == 200  # testserver, an --allowed-host here
    # a rebinding page cannot spend a labeler's log-in backoff: its POST /login never reaches the handler
    page = c.get("/login")
    r = c.post("/login", data=dict(name="alice", password="wrong password!", csrf_token=csrf_of(page.text)),
               headers={"host": "evil.example:8123", "origin": "http://evil.example:8123"})
    assert r.status_code == 400
    assert not w.store.audit_entries(action="login_failed")
    # without a public URL (and no --allowed-host) only the local names are answered
    (tmp_path / "w2").mkdir()
    w2 = make_world(tmp_path / "w2", allowed_hosts=())
    c2 = TestClient(w2.app, base_url="http://127.0.0.1:8000")
    assert c2.get("/api/health").status_code == 200
    assert c2.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
    assert c2.get("/api/health", headers={"host": "testserver"}).status_code == 400


def test_same_origin_compares_with_the_allowed_origins_not_the_host(tmp_path):
    w = make_world(tmp_path, public_url="http://127.0.0.1:8123", allowed_hosts=("testserver",))
    c = TestClient(w.app, base_url="http://127.0.0.1:8123")
    csrf = login(c, "alice")
    # the public URL's own origin: the write goes through
    ok = c.post("/api/next", headers={"x-csrf-token": csrf, "origin": "http://127.0.0.1:8123"})
    assert ok.status_code in (200, 204), ok.text
    # Origin equal to an allowed Host header but not an allowed origin (the old check compared with Host)
    r = c.post("/api/next", headers={"x-csrf-token": csrf, "origin": "http://127.0.0.1:9999",
                                     "host": "127.0.0.1:8123"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = c.post("/api/next", headers={"x-csrf-token": csrf, "origin": "https://evil.example"})
    assert r.status_code == 403
    # log-in from another origin is refused before the password check (no backoff spent, nothing audited)
    page = c.get("/login")
    r = c.post("/login", data=dict(name="alice", password="wrong password!", csrf_token=csrf_of(page.text)),
               headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and not w.store.audit_entries(action="login_failed")


def test_allowed_host_flag_maps_to_the_setting(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from megacoach.app import cli as app_cli
    from megacoach.app import server
    from megacoach.app.settings import AppSettings
    from megacoach.errors import ConfigError

    seen = {}
    monkeypatch.setattr(server, "serve", lambda db, host, port, settings, server=None: seen.update(settings=settings))
    r = CliRunner().invoke(app_cli.app, ["serve", "--db", str(tmp_path / "l.db"), "--allowed-host", "Lab.Internal",
                                         "--allowed-host", "10.0.0.5:8000", "--public-url", "https://l.example.org"])
    assert r.exit_code == 0, r.output
    assert seen["settings"].allowed_hosts == ("lab.internal", "10.0.0.5:8000")
    assert seen["settings"].public_url == "https://l.example.org"
    assert app_cli._settings().allowed_hosts == ()
    for bad in ("https://x.example", "a b", "x/y", ""):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            AppSettings.from_mapping(dict(allowed_hosts=(bad,)))
