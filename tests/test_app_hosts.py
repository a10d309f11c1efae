"""The labeling app answers only its own host names, takes browser writes only from its own origins, and
holds every request head to max_header_bytes however the bytes arrive (app/hosts.py, app/httpguard.py)."""

from __future__ import annotations

import socket

import h11
import pytest
from fastapi.testclient import TestClient

from test_app_support import FAST, csrf_of, login, make_world, server_in_thread


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


# ----- the request-head limit ----------------------------------------------------------------------

def _served(tmp_path):
    import uvicorn

    from megacoach.app.httpguard import uvicorn_options

    w = make_world(tmp_path)
    opts = uvicorn_options(w.app.state.mc.settings)
    return server_in_thread(uvicorn.Config(w.app, log_level="warning", access_log=False, lifespan="off", **opts))


def _status(sock: socket.socket) -> bytes:
    """The status line the server sent before closing (b"" if it reset the connection first)."""
    sock.settimeout(5)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data.split(b"\r\n", 1)[0]


def _head(pad: int) -> bytes:
    return b"GET /api/health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: " + b"a" * pad + b"\r\n\r\n"


def test_head_size_is_counted_on_the_complete_head():
    from megacoach.app.httpguard import head_size, limit_heads

    assert head_size(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nbody") == len(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert head_size(b"GET / HTTP/1.1\r\nhost: x\r\n") == 25
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    limit_heads(conn, 16 * 1024)
    conn.receive_data(_head(100_000))  # a whole head in one read: h11's own limit never sees it
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event()
    # a small request, then an oversized one pipelined behind it in the same read
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    limit_heads(conn, 16 * 1024)
    conn.receive_data(_head(10) + _head(50_000))
    assert isinstance(conn.next_event(), h11.Request) and isinstance(conn.next_event(), h11.EndOfMessage)
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event()
    # at the limit exactly: parsed
    conn = h11.Connection(h11.SERVER)
    limit_heads(conn, len(_head(100)))
    conn.receive_data(_head(100))
    assert isinstance(conn.next_event(), h11.Request)


def test_oversized_heads_are_refused_however_they_arrive(tmp_path):
    import time

    with _served(tmp_path) as port:
        for pad in (20_000, 100_000, 200_000):  # one write each
            with socket.create_connection(("127.0.0.1", port)) as s:
                try:
                    s.sendall(_head(pad))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                status = _status(s)
            assert b" 200 " not in status and (status == b"" or b" 400 " in status), (pad, status)
            if pad == 20_000:
                assert b" 400 " in status  # read whole by the server: it answers before closing
        # in two writes, 20 KB then the rest 0.3 s later (h11's incomplete-head limit)
        with socket.create_connection(("127.0.0.1", port)) as s:
            head = _head(40_000)
            s.sendall(head[:20_000])
            time.sleep(0.3)
            try:
                s.sendall(head[20_000:])
            except (BrokenPipeError, ConnectionResetError):
                pass
            status = _status(s)
        assert b" 200 " not in status and (status == b"" or b" 400 " in status), status
        # a head just within the limit is served, in one write and split
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_head(15_000))
            assert b" 200 " in _status(s)
        with socket.create_connection(("127.0.0.1", port)) as s:
            head = _head(15_000)
            s.sendall(head[:7000])
            time.sleep(0.2)
            s.sendall(head[7000:])
            assert b" 200 " in _status(s)
