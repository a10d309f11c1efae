// Keyboard-only labeling for the human evaluators (no mouse needed, no external scripts).
//   1..K  pick a continuation        Enter  submit the label
//   E     the continuations are equally good (no single best)
//   N     none of them is acceptable
//   S     skip (then 1..n picks a reason, Enter confirms, Esc cancels)
//   F     flag the item (focuses the note; Esc leaves the note)
//   R     type a reason or note without flagging (Esc leaves it)
//   G     open / close the guidelines
"use strict";
(function () {
  // Without an item held, the page has a form that takes the next one (a POST: a GET never
  // assigns an item). Send it at once, unless the queue was empty a moment ago.
  const next = document.getElementById("next-form");
  if (next && next.dataset.auto === "1") { next.submit(); return; }
  const form = document.getElementById("label-form");
  if (!form) return;
  const skipForm = document.getElementById("skip-form");
  const skipPanel = document.getElementById("skip-panel");
  const flag = document.getElementById("flagged");
  const flagBox = document.getElementById("flag-box");
  const note = document.getElementById("note");
  const guide = document.getElementById("guidelines-dialog");
  const status = document.getElementById("key-status");
  const elapsed = document.getElementById("elapsed-ms");
  const options = Array.from(form.querySelectorAll('input[name="choice"]'));
  const choices = options.filter(function (c) { return /^[0-9]+$/.test(c.value); });
  const tie = document.getElementById("choice-tie");
  const none = document.getElementById("choice-none");
  const reasons = skipForm ? Array.from(skipForm.querySelectorAll('input[name="reason_choice"]')) : [];
  const started = performance.now();
  let sending = false;
  form.noValidate = true;
  if (skipForm) skipForm.noValidate = true;

  function say(text) { if (status) status.textContent = text; }
  function chosen() { return options.find(function (c) { return c.checked; }); }
  function mark() {
    options.forEach(function (c) {
      const card = c.closest(".choice");
      if (card) card.classList.toggle("selected", c.checked);
    });
  }
  function setFlag(on) {
    flag.checked = on;
    flagBox.classList.toggle("on", on);
    if (on) { note.focus(); say("Flagged. Type a note (optional), Esc to leave it."); }
    else { say("Flag removed."); }
  }
  function skipOpen() { return skipPanel && !skipPanel.hidden; }
  function openSkip() {
    skipPanel.hidden = false;
    say("Skip: press 1-" + reasons.length + " for a reason, Enter to confirm, Esc to cancel.");
  }
  function closeSkip() { skipPanel.hidden = true; say(""); }
  function guideOpen() { return guide && guide.open; }
  function toggleGuide() {
    if (!guide) return;
    if (guide.open) guide.close(); else guide.showModal();
  }
  function submitLabel() {
    if (sending) return;
    if (!chosen()) { say("Pick a continuation first: press 1-" + choices.length + " (or E equally good, N none acceptable)."); return; }
    elapsed.value = String(Math.round(performance.now() - started));
    sending = true;
    form.submit();
  }
  function submitSkip() {
    if (sending) return;
    const other = document.getElementById("reason-text");
    const picked = reasons.find(function (r) { return r.checked; });
    if (!picked && !(other && other.value.trim())) { say("Choose a reason: press 1-" + reasons.length + "."); return; }
    sending = true;
    skipForm.submit();
  }

  options.forEach(function (c) { c.addEventListener("change", mark); });
  form.addEventListener("submit", function (e) { e.preventDefault(); submitLabel(); });
  if (skipForm) skipForm.addEventListener("submit", function (e) { e.preventDefault(); submitSkip(); });
  if (flag) flag.addEventListener("change", function () { flagBox.classList.toggle("on", flag.checked); });
  const skipButton = document.getElementById("skip-open");
  if (skipButton) skipButton.addEventListener("click", openSkip);
  const skipCancel = document.getElementById("skip-cancel");
  if (skipCancel) skipCancel.addEventListener("click", closeSkip);
  const guideButton = document.getElementById("guidelines-open");
  if (guideButton) guideButton.addEventListener("click", toggleGuide);
  const guideClose = document.getElementById("guidelines-close");
  if (guideClose) guideClose.addEventListener("click", toggleGuide);

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const key = e.key;
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type === "text") || t.isContentEditable);
    if (guideOpen()) {
      if (key === "g" || key === "G") { e.preventDefault(); guide.close(); }
      return; // Esc closes the dialog natively
    }
    if (typing) {
      if (key === "Escape") { e.preventDefault(); t.blur(); say(""); }
      else if (key === "Enter") {
        e.preventDefault();
        if (t.form === skipForm) submitSkip(); else submitLabel();
      }
      return;
    }
    if (skipOpen()) {
      const n = parseInt(key, 10);
      if (!isNaN(n) && n >= 1 && n <= reasons.length) { e.preventDefault(); reasons[n - 1].checked = true; say("Reason " + n + ". Enter to skip, Esc to cancel."); }
      else if (key === "Enter") { e.preventDefault(); submitSkip(); }
      else if (key === "Escape") { e.preventDefault(); closeSkip(); }
      else if (key === "t" || key === "T") { e.preventDefault(); document.getElementById("reason-text").focus(); }
      return;
    }
    const n = parseInt(key, 10);
    if (!isNaN(n) && n >= 1 && n <= choices.length) {
      e.preventDefault();
      choices[n - 1].checked = true;
      mark();
      say("Picked " + n + ". Enter to submit.");
    } else if ((key === "e" || key === "E") && tie) {
      e.preventDefault(); tie.checked = true; mark(); say("Equally good. Enter to submit.");
    } else if ((key === "n" || key === "N") && none) {
      e.preventDefault(); none.checked = true; mark(); say("None acceptable. Enter to submit.");
    } else if (key === "Enter") {
      e.preventDefault(); submitLabel();
    } else if (key === "s" || key === "S") {
      e.preventDefault(); openSkip();
    } else if (key === "f" || key === "F") {
      e.preventDefault(); setFlag(!flag.checked);
    } else if (key === "r" || key === "R") {
      e.preventDefault(); note.focus(); say("Type your reason (optional), Esc to leave it, Enter to submit.");
    } else if (key === "g" || key === "G") {
      e.preventDefault(); toggleGuide();
    }
  });
  mark();
})();
