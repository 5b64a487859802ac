"""MkDocs hook: the docstrings name things with Sphinx roles (:class:`X`), which Markdown leaves
as text; drop the role so the name reads as code."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|obj|data):(?=<code)")


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub("", html)
