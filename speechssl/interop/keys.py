"""Parameter-name mapping between speechssl and other toolkits' state dicts.

A mapping is a list of ``(a, b)`` prefix pairs where ``{i}`` stands for a layer number; the rest of
the key after the prefix is kept.
"""

from __future__ import annotations

import re


def _regex(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"(\d+)")


def rename(key: str, pairs: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """``key`` renamed by the first pair whose ``a`` (``b`` if ``reverse``) prefix matches it, or None."""
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        m = re.match(_regex(src), key)
        if m:
            prefix = dst.replace("{i}", m.group(1)) if "{i}" in src else dst
            return prefix + key[m.end():]
    return None
