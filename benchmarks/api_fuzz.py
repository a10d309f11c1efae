"""Schemathesis over the labeling app's OpenAPI description, as an API token, a labeler and an admin.

    .venv/bin/python benchmarks/api_fuzz.py                  # 100 examples per operation, mode and identity
    .venv/bin/python benchmarks/api_fuzz.py --examples 5     # a smoke-test size
    .venv/bin/python benchmarks/api_fuzz.py --modes positive # only requests that fit the schema

The app (``create_app``) runs in this process over a fresh SQLite label store (a temporary folder) with a few
items, a guideline, people and a program account; schemathesis (``pip install schemathesis``) reads
``/openapi.json`` and generates requests for every operation in it, both ones that fit the schema
(``positive``) and ones that do not (``negative``), sent through the ASGI interface. Each identity gets
fresh credentials for every operation, so that an operation that ends a log-in or revokes a token (the admin's
do) does not starve the next one:

- ``token``   ``Authorization: Bearer`` with a program account's API token (scopes label and read);
- ``labeler`` a labeler's log-in session (cookie) with its CSRF token in ``X-CSRF-Token``;
- ``admin``   an admin's log-in session, the same way.

What counts is the server's answer: any 5xx is a server error (printed with its request). Prints one JSON
line: operations, requests and server errors per identity, the status codes seen, how many (operation, mode)
pairs had no request to generate (``unsatisfiable``: an operation without parameters has no invalid request),
the first few server errors, the wall time and the versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

IDENTITIES = ("token", "labeler", "admin")
MODES = ("positive", "negative")
PASSWORD = "fuzz-password-1234"
# "testserver": the Host that schemathesis's in-process ASGI client sends (the app answers allowed hosts only)
SETTINGS = dict(argon2_time_cost=1, argon2_memory_kib=1024, too_fast_s=0.0, allowed_hosts=("testserver",))


def _world(folder: Path):
    """The store, the app and a way to mint fresh credentials for each identity."""
    from megacoach.app.auth import Principal
    from megacoach.app.security import Passwords
    from megacoach.app.server import create_app
    from megacoach.app.settings import AppSettings
    from megacoach.labels.records import NewSample
    from megacoach.labels.store import LabelStore

    store = LabelStore(f"sqlite:///{folder / 'labels.db'}")
    pw = Passwords.from_settings(AppSettings(**SETTINGS)).hash(PASSWORD)
    people = {name: store.get_or_create_labeler(name, kind="person", role=role, password_hash=pw)
              for name, role in (("root", "admin"), ("alice", "labeler"))}
    store.set_guideline("1", "# Guidelines\n\nPick the **best** continuation.", created_by="root")
    store.create_items([dict(query_text=f"Prompt {i}: To be, or not to be", query_token_ids=[1, 2, 3],
                             samples=[NewSample(f"continuation {i}.{j}", [4 + j], policy="ckpt-0", iteration=0, seed=j)
                                      for j in range(4)], batch="b0") for i in range(20)])
    app = create_app(settings=SETTINGS, store=store)
    auth = app.state.mc.auth

    def credentials(identity: str) -> tuple[dict, dict]:
        """(headers, cookies) of a fresh log-in or token."""
        if identity == "token":
            raw, _ = auth.create_api_token("trainer", "fuzz", days=1)
            return {"Authorization": f"Bearer {raw}"}, {}
        rec = store.get_labeler("root" if identity == "admin" else "alice")
        if not rec.active:  # an admin operation deactivated them: back, so the run goes on
            store.update_labeler(rec.id, active=True)
        secret, who = auth.start_session(Principal(rec.id, rec.name, rec.role, rec.kind, "session"))
        return {"X-CSRF-Token": who.csrf or ""}, {"mc_session": secret}

    return store, app, credentials


def run(examples: int, modes: tuple[str, ...], identities: tuple[str, ...] = IDENTITIES, seed: int = 0) -> dict:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    folder = Path(tempfile.mkdtemp(prefix="megacoach-fuzz-"))
    store, app, credentials = _world(folder)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    per: dict = {}
    failures: list[dict] = []
    t0 = time.perf_counter()
    for identity in identities:
        codes: Counter = Counter()
        unsatisfiable = 0
        for op in operations:
            headers, cookies = credentials(identity)
            for mode in modes:
                strategy = op.as_strategy(generation_mode=GenerationMode(mode))

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), phases=[Phase.generate], print_blob=False)
                @given(case=strategy)
                def one(case) -> None:
                    r = case.call(headers=dict(case.headers or {}, **headers),
                                  cookies=dict(case.cookies or {}, **cookies))
                    codes[r.status_code] += 1
                    if r.status_code >= 500 and len(failures) < 20:
                        failures.append(dict(identity=identity, mode=mode, operation=f"{op.method.upper()} {op.path}",
                                             status=r.status_code, query=case.query, body=repr(case.body)[:300],
                                             answer=r.text[:300]))

                try:
                    one()
                except hypothesis.errors.Unsatisfiable:  # e.g. no invalid request exists for an operation
                    unsatisfiable += 1                    # without parameters (negative mode)
        per[identity] = dict(requests=sum(codes.values()), unsatisfiable=unsatisfiable,
                             server_errors=sum(n for c, n in codes.items() if c >= 500),
                             statuses={str(k): v for k, v in sorted(codes.items())})
    elapsed = time.perf_counter() - t0
    store.close()
    return dict(benchmark="api_fuzz", operations=len(operations), examples=examples, modes=list(modes),
                requests=sum(p["requests"] for p in per.values()),
                server_errors=sum(p["server_errors"] for p in per.values()), identities=per,
                first_server_errors=failures[:5], seconds=round(elapsed, 1),
                versions=dict(schemathesis=schemathesis.__version__ if hasattr(schemathesis, "__version__") else None,
                              hypothesis=hypothesis.__version__, python=sys.version.split()[0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100, help="examples per operation, mode and identity")
    p.add_argument("--modes", default="positive,negative", help="positive, negative or both (comma-separated)")
    p.add_argument("--identities", default=",".join(IDENTITIES), help="token, labeler, admin (comma-separated)")
    a = p.parse_args(argv)
    modes = tuple(m for m in a.modes.split(",") if m)
    identities = tuple(i for i in a.identities.split(",") if i)
    if not 1 <= a.examples <= 10_000 or not modes or set(modes) - set(MODES) or not identities \
            or set(identities) - set(IDENTITIES):
        p.error(f"examples 1..10000; modes from {MODES}; identities from {IDENTITIES}")
    print(json.dumps(run(a.examples, modes, identities), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
