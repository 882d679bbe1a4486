"""Server paths out of client-facing text: error messages, probe reasons and deployment reasons often quote an
exception, and a loader's exception names the folder it read (``/srv/conch/var/models/ft-x/config.json``).

Each path becomes its last component (``config.json``): enough to tell what was missing, nothing about the
server's layout. A path is an absolute one with at least one folder, or a relative one with at least two; URLs
(``http://host/path``) and model ids with one slash (``org/model``) are left alone.
"""

from __future__ import annotations

import re

_PART = r"[^\s/'\"`,;:()\[\]{}<>]+"
# Not preceded by a character that would make it the middle of a word, URL or longer path.
_PATH_RE = re.compile(rf"(?<![\w.:/~-])(?:(?:/{_PART})+/({_PART})|{_PART}(?:/{_PART})+/({_PART}))/?")
# A Windows path (C:\models\x) on a host that has them.
_WINDOWS_RE = re.compile(r"\b[A-Za-z]:\\(?:[^\s\\'\"`]+\\)+([^\s\\'\"`]*)")


def _last(match: re.Match[str]) -> str:
    return next((group for group in match.groups() if group), "")


def hide_paths(text: str) -> str:
    """``text`` with every server path replaced by its last component."""
    return _WINDOWS_RE.sub(_last, _PATH_RE.sub(_last, text))
