"""Browser test: Debian's Chromium driven by Playwright against uvicorn on 127.0.0.1.

A labeler, with the keyboard only, says two continuations are equally good (E, with a reason typed after
R) and misses a gold item, whose expected choice and explanation are shown at once; an adjudicator then
opens the disagreement, sees both people's choices with their reasons and decides it (a number, T for the
reason, Enter): the Values Coach's training view holds the decision. Skipped (with the reason) only when
/usr/bin/chromium or the playwright package is missing.
"""

from __future__ import annotations

import pytest

from test_app_support import FAST, browser, keyboard_login, live_server, make_person, make_store  # noqa: F401 (browser: a fixture)

pytestmark = pytest.mark.browser

DISPUTED = ("Shall I compare thee to a summer's day?", [
    " Thou art more lovely and more temperate.",
    " Rough winds do shake the darling buds of May.",
    " Day day day summer summer compare compare.",
    " And summer's lease hath all too short a date.",
])
GOLD = ("To be, or not to be, that is the question:", [
    " Whether 'tis nobler in the mind to suffer",
    " be be be be be be be be",
    " the question the question the question",
    " xq zz vv",
])
WHY = "Only the first continues the soliloquy; the others repeat or garble it."


def seed(store) -> tuple[int, int]:
    from megacoach.labels.records import NewSample

    def samples(texts):
        return [NewSample(t, [3 + j], policy="runs/b/ckpt-1", iteration=1, run_id="run-b") for j, t in enumerate(texts)]

    disputed = store.create_item(DISPUTED[0], [1, 2], samples(DISPUTED[1]), batch="b1", source="online", overlap=2)
    gold = store.create_item(GOLD[0], [1, 2], samples(GOLD[1]), batch="gold", is_gold=True, gold_choice=0,
                             gold_explanation=WHY)
    store.set_guideline("1", "# How to choose\n\nPrefer coherent verse.", created_by="root")
    return disputed.item.id, gold.item.id






def _position(page, text: str) -> str:
    return page.locator(".choice", has_text=text).first.get_attribute("data-position")


def test_tie_gold_feedback_and_adjudication_with_the_keyboard(tmp_path, browser):
    from megacoach.app.server import create_app

    store = make_store(tmp_path)
    make_person(store, "root", "admin")
    make_person(store, "alice")
    bob = make_person(store, "bob")
    make_person(store, "carol")
    store.update_labeler("carol", adjudicator=True)
    disputed, gold = seed(store)
    # bob has picked the first continuation, with his reason
    store.add_comparison(disputed, 0, bob, note="the first one scans", guideline_version="1")
    app = create_app(settings=dict(FAST, too_fast_s=0.5, overlap=2), store=store)
    with live_server(app) as base:
        ctx = browser.new_context(viewport=dict(width=1100, height=900))
        page = ctx.new_page()
        page.set_default_timeout(10_000)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        keyboard_login(page, base, "alice")
        assert page.url.endswith("/label")
        done = set()
        while len(done) < 2:
            prompt = page.locator("#prompt").inner_text().strip()
            page.wait_for_timeout(600)  # not too fast
            if prompt == DISPUTED[0]:
                # E: equally good; R: the reason, typed; Enter submits from the reason field
                page.keyboard.press("e")
                assert "selected" in page.locator('.choice[data-verdict="tie"]').get_attribute("class")
                page.keyboard.press("r")
                assert page.evaluate("document.activeElement.id") == "note"
                page.keyboard.type("1 and 4 are equally good")
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                assert "Label saved" in page.locator(".flash").inner_text()
                assert not page.locator("#gold-feedback").count()
                done.add("tie")
            else:
                assert prompt == GOLD[0]
                wrong = _position(page, GOLD[1][2].strip())
                page.keyboard.press(wrong)
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                feedback = page.locator("#gold-feedback")
                assert feedback.is_visible()
                assert page.locator("#gold-explanation").inner_text().endswith(WHY)
                assert page.locator("#gold-expected").inner_text().strip() == GOLD[1][0].strip()
                assert page.locator("#gold-yours").inner_text() == wrong
                done.add("gold")
        labels = {c.item_id: c for c in store.comparisons(view="all", labeler="alice")}
        assert labels[disputed].verdict == "tie" and labels[disputed].chosen is None
        assert labels[disputed].note == "1 and 4 are equally good"
        assert labels[gold].chosen == 2
        assert [c.item_id for c in store.comparisons(labeler="alice")] == [gold]  # the tie stays out of training

        # carol, an adjudicator, decides the disagreement with the keyboard
        page.context.clear_cookies()
        keyboard_login(page, base, "carol")
        with page.expect_navigation():
            page.click("#adjudicate-link")
        rows = page.locator("#dispute-labels").inner_text()
        assert "alice" in rows and "equally good" in rows and "1 and 4 are equally good" in rows
        assert "bob" in rows and "the first one scans" in rows
        page.keyboard.press("4")
        assert "selected" in page.locator('.choice[data-position="4"]').get_attribute("class")
        page.keyboard.press("t")
        page.keyboard.type("4 closes the quatrain")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "Decision saved" in page.locator(".flash").inner_text()
        assert page.locator("#no-disputes").is_visible()
        training = [c for c in store.comparisons() if c.item_id == disputed]
        assert [(c.labeler_name, c.chosen, c.adjudication, c.note) for c in training] == [
            ("carol", 3, True, "4 closes the quatrain")]

        # the admin's dashboard shows the decision and the labelers' disagreement and gold accuracy
        page.context.clear_cookies()
        keyboard_login(page, base, "root")
        assert page.url.endswith("/admin")
        assert page.locator("#disputes-open").inner_text() == "0"
        people = page.locator("#people").inner_text()
        assert "0.0%" in people and "100.0%" in people  # alice's and bob's disagreement on the one shared item
        assert page.locator("#disagreement-by-version").is_visible()
        assert not errors, errors
