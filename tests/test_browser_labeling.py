"""Browser tests: Debian's Chromium driven by Playwright against uvicorn on 127.0.0.1.

A labeler logs in, labels several items with the keyboard only, opens the guidelines, flags, skips and
pulls the Andon cord; an admin invites a new labeler and exports the labels. Skipped (with the reason)
only when /usr/bin/chromium or the playwright package is missing.
Set MEGACOACH_WRITE_SCREENSHOT=1 to refresh docs/labeling-page.png.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from test_app_support import (
    FAST,
    PASSWORD,
    browser,  # noqa: F401 (a fixture)
    keyboard_login,
    live_server,
    make_person,
    make_store,
)

pytestmark = pytest.mark.browser

DOCS = Path(__file__).resolve().parents[1] / "docs"

PROMPTS = [
    ("Now is the winter of our discontent", [
        " made glorious summer by this sun of York; and all the clouds that lour'd upon our house",
        " and I, that am not shaped for sportive tricks, do wait upon the hour with heavy heart",
        " the the the the of our of our winter winter discontent discontent",
        " good good good happy happy wonderful great excellent good good",
    ]),
    ("What light through yonder window breaks?", [
        " It is the east, and Juliet is the sun.",
        " Arise, fair sun, and kill the envious moon.",
        " The night is long that never finds the day.",
        " Good, good, good, good, good, good.",
    ]),
]


def seed(store, n_extra: int = 6) -> None:
    from megacoach.labels.records import NewSample

    specs = []
    for i in range(n_extra):
        q, conts = PROMPTS[i % len(PROMPTS)]
        specs.append(dict(query_text=q, query_token_ids=[1, 2], batch="b1", source="online", run_id="run-b",
                          samples=[NewSample(t, [3 + j], policy="runs/b/ckpt-3", iteration=3, run_id="run-b")
                                   for j, t in enumerate(conts)]))
    store.create_items(specs)
    store.set_guideline("1", "# How to choose\n\n1. Prefer **coherent** verse.\n2. Penalise repetition.\n\n"
                             "<script>document.title='pwned'</script>", created_by="root")
    store.set_run_status("run-b", "running", iteration=3)






def test_labeler_keyboard_only_flag_skip_andon_and_admin_export(tmp_path, browser):
    from megacoach.app.server import create_app

    store = make_store(tmp_path)
    make_person(store, "root", "admin")
    make_person(store, "alice")
    seed(store)
    app = create_app(settings=dict(FAST, too_fast_s=0.5), store=store)
    with live_server(app) as base:
        ctx = browser.new_context(viewport=dict(width=1100, height=900))
        page = ctx.new_page()
        page.set_default_timeout(10_000)
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        keyboard_login(page, base, "alice")
        assert page.url.endswith("/label")
        assert page.locator("#prompt").inner_text().strip()

        # picks and submits with the keyboard only
        for n, key in enumerate(["2", "1", "4"], start=1):
            page.keyboard.press(key)
            assert page.locator(f'.choice[data-position="{key}"]').get_attribute("class").endswith("selected")
            page.wait_for_timeout(600)  # not too fast
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert "Label saved" in page.locator(".flash").inner_text()
            assert len(store.comparisons()) == n
        # Enter without a pick does not submit
        page.keyboard.press("Enter")
        assert "Pick a continuation first" in page.locator("#key-status").inner_text()

        # G opens the (safely rendered) guidelines, Esc closes them
        page.keyboard.press("g")
        dialog = page.locator("#guidelines-dialog")
        assert dialog.is_visible() and "Prefer" in dialog.inner_text()
        assert page.title() != "pwned"
        page.keyboard.press("Escape")
        assert not dialog.is_visible()

        # the screenshot for the README: the best continuation picked with its number key
        best = page.locator(".choice", has_text=re.compile("glorious|Juliet is the sun")).first.get_attribute("data-position")
        page.keyboard.press(best)
        shot = tmp_path / "labeling-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("MEGACOACH_WRITE_SCREENSHOT") == "1":
            DOCS.mkdir(exist_ok=True)
            page.screenshot(path=str(DOCS / "labeling-page.png"), full_page=True)

        # F flags and focuses the note; Enter in the note submits the label
        page.keyboard.press("3")
        page.keyboard.press("f")
        assert page.evaluate("document.activeElement.id") == "note"
        page.keyboard.type("looks garbled <b>")
        page.wait_for_timeout(600)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        flagged = [c for c in store.comparisons() if c.flagged]
        assert len(flagged) == 1 and flagged[0].note == "looks garbled <b>"

        # S skips: a digit picks the reason, Enter confirms
        skipped_item = int(page.locator('input[name="item_id"]').first.get_attribute("value"))
        page.keyboard.press("s")
        assert page.locator("#skip-panel").is_visible()
        page.keyboard.press("2")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "Skipped" in page.locator(".flash").inner_text()
        (skip,) = store.skips()
        assert skip.item_id == skipped_item and skip.reason == app.state.mc.settings.skip_reasons[1]
        assert int(page.locator('input[name="item_id"]').first.get_attribute("value")) != skipped_item

        # the Andon cord: reason, button; the run pauses and the banner shows on every page
        page.click("#andon-link")
        page.fill("#andon-reason", "every continuation repeats 'good good good'")
        with page.expect_navigation():
            page.click("#andon-submit")
        assert store.get_run_status("run-b").status == "paused"
        page.goto(base + "/label")
        assert "PAUSED" in page.locator("#run-banner").inner_text()
        assert not console_errors, console_errors

        # the admin sees the banner, invites a labeler, and exports the labels
        actx = browser.new_context(accept_downloads=True)
        admin = actx.new_page()
        admin.set_default_timeout(10_000)
        keyboard_login(admin, base, "root")
        assert admin.url.endswith("/admin")
        assert "PAUSED" in admin.locator("#run-banner").inner_text()
        assert "every continuation repeats" in admin.locator("#andon-pulls").inner_text()
        admin.goto(base + "/admin/people")
        admin.fill("#invite-name", "carol")
        with admin.expect_navigation():
            admin.click("#invite-submit")
        link = admin.locator("#created-secret").inner_text().strip()
        assert re.match(r"/invite/[\w-]+$", link)  # no public_url configured: a path, never the Host header's
        assert "public URL" in admin.locator("#created-note").inner_text()
        gctx = browser.new_context()
        guest = gctx.new_page()
        guest.goto(base + link)
        guest.wait_for_function("document.activeElement && document.activeElement.name === 'password'")
        guest.keyboard.type(PASSWORD)
        guest.keyboard.press("Tab")
        guest.keyboard.type(PASSWORD)
        with guest.expect_navigation():
            guest.keyboard.press("Enter")
        assert guest.url.endswith("/label") and "carol" in guest.locator(".who").inner_text()
        gctx.close()

        admin.goto(base + "/admin")
        with admin.expect_download() as dl:
            admin.click("#export-link")
        lines = [json.loads(x) for x in Path(dl.value.path()).read_text().splitlines()]
        assert len(lines) == len(store.comparisons()) == 4
        assert {x["labeler"] for x in lines} == {"alice"} and any(x["flagged"] for x in lines)
        assert all(x["samples"][0]["policy"] == "runs/b/ckpt-3" for x in lines)
        actions = {e.action for e in store.audit_entries()}
        assert {"login", "label", "flag", "skip", "andon_pull", "invite", "invite_accept", "export"} <= actions
        actx.close()
        ctx.close()
