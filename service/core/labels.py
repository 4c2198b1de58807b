"""Labels: the names of datasets and models. Shown, never used as file names; still, kept printable."""

from __future__ import annotations

import re

LABEL_RE = re.compile(r"^[\w][\w .,:()+@=-]{0,199}$")
LABEL_RULE = "1-200 characters: letters, digits, space and . , : ( ) + @ = - _ (not starting with punctuation)"


def check_label(value: str) -> str | None:
    """The problem with a name, or None."""
    if not LABEL_RE.match(value) or ".." in value:
        return f"invalid name {value[:50]!r}: {LABEL_RULE}"
    return None
