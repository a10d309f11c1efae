"""Progress of a long stage, one mechanism for all of them: label sampling, the Values Coach's training, the guards'
preflight and PPO.

`StageProgress` shows a live bar where output is a terminal. Where it is not (piped into a file, a CI log) it
prints plain lines instead, `LABEL DONE/TOTAL [UNIT]  RATE/s  ETA M:SS  FIGURES`, at most one every `every_s`
seconds (and always the last one), so a piped run is never silent for long. With no console (a caller that only has
a `log` function) it prints the plain lines through `log`.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def clock(seconds: float) -> str:
    """0:42, 12:05, 1:02:03; '?' for an unknown (infinite or NaN) time."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plain_line(label: str, done: int, total: int, elapsed: float, unit: str = "", figures: str = "",
               rate: bool = True, start_done: int = 0) -> str:
    """One plain progress line: where the stage is, its rate and the time left at that rate (the rate counts the
    steps done in `elapsed`, those after `start_done`)."""
    parts = [f"{label} {done}/{total}" + (f" {unit}" if unit else "")]
    mine = done - start_done
    if rate and mine > 0 and elapsed > 0:
        per_s = mine / elapsed
        parts.append(f"{per_s:.3g} {unit or 'steps'}/s" if per_s >= 0.1 else f"{elapsed / mine:.3g} s/{_one(unit)}")
        parts.append(f"ETA {clock((total - done) / per_s)}")
    if figures:
        parts.append(figures)
    return "  ".join(parts)


def _one(unit: str) -> str:
    """'iterations' -> 'iteration' (a time per one of them)."""
    return (unit[:-1] if unit.endswith("s") else unit) or "step"


class StageProgress:
    """A stage of `total` steps. Use as a context manager; `advance(n, figures)` after each piece of work.

    console: a rich Console (a live bar on a terminal, plain lines elsewhere); None: plain lines through `log`.
    every_s: the least time between two plain lines (0: one line per advance). completed: steps done before
    (a resumed stage); the rate counts only the steps done since the start of this one.
    """

    def __init__(self, label: str, total: int, *, console=None, log: Callable[[str], None] | None = None,
                 unit: str = "", every_s: float = 30.0, completed: int = 0, rate: bool = True):
        self.label, self.total, self.unit, self.every_s, self.show_rate = label, max(0, int(total)), unit, every_s, rate
        self.console, self.log = console, log
        self.done = self._start_done = int(completed)
        self._bar = None
        self._task = None
        self._t0 = self._last_line = time.perf_counter()

    @property
    def live(self) -> bool:
        return self.console is not None and self.console.is_terminal

    def __enter__(self) -> StageProgress:
        if self.live:
            cols = [TextColumn(f"[bold]{self.label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[figures]}")]
            self._bar = Progress(*cols, console=self.console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, figures="")
        self._t0 = self._last_line = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def advance(self, n: int = 1, figures: str = "") -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, figures=figures)
            return
        now = time.perf_counter()
        if self.done >= self.total or now - self._last_line >= self.every_s:
            self._last_line = now
            self._emit(plain_line(self.label, self.done, self.total, now - self._t0, self.unit, figures,
                                  self.show_rate, self._start_done))

    def _emit(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        elif self.log is not None:
            self.log(text)

