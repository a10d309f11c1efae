"""Safe markdown rendering for the versioned guidelines.

Raw HTML in the markdown is escaped (never passed through), and links with unsafe schemes
(javascript:, vbscript:, file:, data: other than images) are dropped by markdown-it's link check.
"""

from __future__ import annotations

from functools import lru_cache

from markdown_it import MarkdownIt
from markupsafe import Markup


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table")
    md.enable("strikethrough")
    return md


@lru_cache(maxsize=64)
def render_markdown(text: str) -> Markup:
    """HTML for the given markdown, safe to insert into a page."""
    return Markup(_parser().render(text))
