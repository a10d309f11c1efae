// Keyboard-only adjudication of a disagreement (no mouse needed, no external scripts).
//   1..K  the best continuation      E  equally good      N  none acceptable
//   T     type the reason (Esc leaves it)                  Enter  decide
"use strict";
(function () {
  const form = document.getElementById("decide-form");
  if (!form) return;
  const options = Array.from(form.querySelectorAll('input[name="choice"]'));
  const numbered = options.filter(function (c) { return /^[0-9]+$/.test(c.value); });
  const note = document.getElementById("decision-note");
  const status = document.getElementById("key-status");
  let sending = false;
  form.noValidate = true;

  function say(text) { if (status) status.textContent = text; }
  function mark() {
    options.forEach(function (c) {
      const card = c.closest(".choice");
      if (card) card.classList.toggle("selected", c.checked);
    });
  }
  function pick(input, text) { input.checked = true; mark(); say(text + " Enter to decide."); }
  function decide() {
    if (sending) return;
    if (!options.find(function (c) { return c.checked; })) { say("Choose first: 1-" + numbered.length + ", E or N."); return; }
    sending = true;
    form.submit();
  }
  options.forEach(function (c) { c.addEventListener("change", mark); });
  form.addEventListener("submit", function (e) { e.preventDefault(); decide(); });
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const key = e.key;
    if (e.target === note) {
      if (key === "Escape") { e.preventDefault(); note.blur(); say(""); }
      else if (key === "Enter") { e.preventDefault(); decide(); }
      return;
    }
    const n = parseInt(key, 10);
    if (!isNaN(n) && n >= 1 && n <= numbered.length) { e.preventDefault(); pick(numbered[n - 1], "Picked " + n + "."); }
    else if (key === "e" || key === "E") { e.preventDefault(); pick(document.getElementById("choice-tie"), "Equally good."); }
    else if (key === "n" || key === "N") { e.preventDefault(); pick(document.getElementById("choice-none"), "None acceptable."); }
    else if (key === "t" || key === "T") { e.preventDefault(); note.focus(); }
    else if (key === "Enter") { e.preventDefault(); decide(); }
  });
  mark();
})();
