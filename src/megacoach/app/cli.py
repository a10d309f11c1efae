"""Typer commands of the labeling app; megacoach.cli puts them in the ``megacoach label`` group:

    megacoach label serve --db URL --host 127.0.0.1 --port 8000   # prints a one-time admin link if no admin
    megacoach label serve --db URL --workers 2                     # two worker processes on one port
    megacoach label create-admin NAME --db URL                     # or make an admin directly (asks a password)
    megacoach label reset-password NAME --db URL                   # a person's new password (role kept)
    megacoach label invite NAME --db URL [--role adjudicator|admin] # an invitation link from the shell
    megacoach label token OWNER --db URL [--scope read] [--days 90] # an API token for the trainer/scripts
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from megacoach.app.errors import AppError
from megacoach.errors import DataError

app = typer.Typer(no_args_is_help=True, help="The human evaluators' labeling app: serve it, make accounts and tokens.")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="Label store: SQLAlchemy URL or SQLite path "
                                                            "(default $MEGACOACH_LABELS_URL or labels.db).")]


def _settings(secure_cookies: bool = False, andon_pulls: Optional[int] = None, overlap: Optional[int] = None,
              run_id: Optional[str] = None, too_fast: Optional[float] = None, public_url: Optional[str] = None,
              item_sources: Optional[list[str]] = None, trusted_proxies: Optional[list[str]] = None,
              allowed_hosts: Optional[list[str]] = None, **more: object):
    """The app's settings from the command's flags (unset flags keep the app's defaults); ``more``:
    further settings by their field names (None: unset)."""
    # imported when a command runs: at start-up the settings model would add 2 ms to `megacoach --help`
    from megacoach.app.settings import AppSettings

    values: dict = {"secure_cookies": secure_cookies}
    for key, value in (("andon_pulls_to_pause", andon_pulls), ("overlap", overlap), ("run_id", run_id),
                       ("too_fast_s", too_fast), ("public_url", public_url),
                       ("item_sources", tuple(item_sources) if item_sources else None),
                       ("trusted_proxies", tuple(trusted_proxies) if trusted_proxies else None),
                       ("allowed_hosts", tuple(allowed_hosts) if allowed_hosts else None),
                       *more.items()):
        if value is not None:
            values[key] = value
    return AppSettings.from_mapping(values)


@app.command("serve")
def serve_cmd(
    db: DbOpt = None,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    secure_cookies: Annotated[bool, typer.Option("--secure-cookies", help="Mark cookies Secure (behind HTTPS).")] = False,
    andon_pulls: Annotated[Optional[int], typer.Option("--andon-pulls", help="Pulls (distinct people) that pause training.")] = None,
    overlap: Annotated[Optional[int], typer.Option("--overlap", help="Labels per ordinary item.")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="The training run to watch (default: latest).")] = None,
    too_fast: Annotated[Optional[float], typer.Option("--too-fast", help="Seconds under which a label is marked too fast.")] = None,
    public_url: Annotated[Optional[str], typer.Option(
        "--public-url", help="Where people reach the app (https://...): the base of invitation links "
                             "(default: links are paths; never the request's Host header).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="Another host name (or name:port) people reach the app by (repeatable). The app "
                               "answers only these, the --public-url's host and, without --public-url, "
                               "localhost/127.0.0.1/::1; any other Host header gets 400.")] = None,
    item_source: Annotated[Optional[list[str]], typer.Option("--item-source", help="Serve only items of this source (repeatable; default all).")] = None,
    trusted_proxy: Annotated[Optional[list[str]], typer.Option(
        "--trusted-proxy", help="IP address of a reverse proxy whose X-Forwarded-For names the client "
                                "(repeatable; default none: the peer is the client).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes on the one port (SQLite or PostgreSQL store).")] = 1,
    threads: Annotated[int, typer.Option("--threads", help="Requests each worker handles at once.")] = 16,
    header_timeout: Annotated[Optional[float], typer.Option("--header-timeout", help="Seconds for a request's line and headers to arrive (else 408, closed; default 10).")] = None,
    body_timeout: Annotated[Optional[float], typer.Option("--body-timeout", help="Seconds for a request's body to arrive (else 408; default 30).")] = None,
    keep_alive: Annotated[Optional[float], typer.Option("--keep-alive", help="Seconds an idle keep-alive connection stays open (default 5).")] = None,
    limit_concurrency: Annotated[int, typer.Option("--limit-concurrency", help="Connections per worker; beyond it new requests get 503.")] = 512,
    login_concurrency: Annotated[Optional[int], typer.Option("--login-concurrency", help="Password checks at once for the whole server, in their own threads, split over the workers (default 2).")] = None,
    login_queue: Annotated[Optional[int], typer.Option("--login-queue", help="Log-ins waiting for a password check (no thread held), split over the workers; beyond it 503 (default 64).")] = None,
):
    """Run the human evaluators' labeling app (web pages + JSON API)."""
    # FastAPI, uvicorn and SQLAlchemy: imported when the command runs, keeps `megacoach --help` light
    from megacoach.app.server import ServerOptions, serve

    options = ServerOptions(workers=workers, threads=threads, limit_concurrency=limit_concurrency)
    settings = _settings(secure_cookies, andon_pulls, overlap, run_id, too_fast, public_url, item_source, trusted_proxy,
                         allowed_host,
                         header_timeout_s=header_timeout, body_timeout_s=body_timeout, keep_alive_timeout_s=keep_alive,
                         password_hash_concurrency=login_concurrency, password_hash_queue=login_queue)
    serve(db, host, port, settings, server=options)


def _new_password(password: Optional[str]) -> str:
    if password is None:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    return password


@app.command("create-admin")
def create_admin_cmd(
    name: Annotated[str, typer.Argument(help="Admin account name.")],
    db: DbOpt = None,
    password: Annotated[Optional[str], typer.Option("--password", help="Default: asked for (hidden).")] = None,
):
    """Create an admin account without the invitation link (an existing admin gets the new password;
    an existing labeler is refused: use reset-password, roles never change here)."""
    # SQLAlchemy: imported when the command runs, keeps `megacoach --help` light
    from megacoach.app.accounts import create_admin

    create_admin(db, name, _new_password(password))
    typer.echo(f"admin {name!r} ready")


@app.command("reset-password")
def reset_password_cmd(
    name: Annotated[str, typer.Argument(help="The person's account name.")],
    db: DbOpt = None,
    password: Annotated[Optional[str], typer.Option("--password", help="Default: asked for (hidden).")] = None,
):
    """Set a person's password (their role stays); their log-ins end."""
    # SQLAlchemy: imported when the command runs, keeps `megacoach --help` light
    from megacoach.app.accounts import reset_password

    role = reset_password(db, name, _new_password(password))
    typer.echo(f"password of {name!r} ({role}) reset; their sessions ended")


@app.command("invite")
def invite_cmd(
    name: Annotated[str, typer.Argument(help="The person's log-in name.")],
    db: DbOpt = None,
    role: Annotated[str, typer.Option(
        "--role", help="labeler, adjudicator (a labeler who also decides disagreements) or admin.")] = "labeler",
    base_url: Annotated[str, typer.Option("--base-url", help="Where the app is reachable.")] = "http://127.0.0.1:8000",
):
    """Print a one-time invitation link for a new labeler (or adjudicator, or admin)."""
    # SQLAlchemy: imported when the command runs, keeps `megacoach --help` light
    from megacoach.app.auth import Auth
    from megacoach.labels.store import LabelStore

    with LabelStore(db) as store:
        try:
            token, info = Auth(store, _settings()).create_invitation(name, role, "megacoach label invite")
        except AppError as e:
            raise DataError(f"invite {name!r}: {e.message}") from None
        store.append_audit("megacoach label invite", "invite", dict(name=info["name"], role=info["role"],
                                                                    invitation_id=info["id"]))
    typer.echo(f"{base_url.rstrip('/')}/invite/{token}")


@app.command("token")
def token_cmd(
    owner: Annotated[str, typer.Argument(help="A program account; a new name becomes one.")] = "trainer",
    db: DbOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Token name.")] = None,
    scope: Annotated[Optional[list[str]], typer.Option(
        "--scope", help="label, read (repeatable; default: both, all a program can have).")] = None,
    days: Annotated[Optional[int], typer.Option("--days", help="Lifetime in days (default 90).")] = None,
):
    """Print a new API token (Authorization: Bearer ...) for the trainer or a script: program
    accounts only (a person mints their own token on the app's People page)."""
    # SQLAlchemy: imported when the command runs, keeps `megacoach --help` light
    from megacoach.app.auth import Auth
    from megacoach.labels.store import LabelStore

    with LabelStore(db) as store:
        try:
            raw, info = Auth(store, _settings()).create_api_token(owner, name or owner, scopes=scope or None, days=days,
                                                                   minted_by="megacoach label token")
        except AppError as e:
            raise DataError(f"token for {owner!r}: {e.message}") from None
        store.append_audit("megacoach label token", "token_create", dict(
            owner=info["owner"], name=info["name"], token_id=info["id"], scopes=info["scopes"],
            expires_at=info["expires_at"].isoformat()))
    typer.echo(raw)
