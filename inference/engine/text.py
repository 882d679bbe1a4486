"""Turning token ids back into text while they stream, and cutting the text at stop strings.

Tokens do not map to whole characters (byte-level BPE splits multi-byte characters), so text is released only
once the decoded tail is no longer an incomplete character; and text that could be the start of a stop string is
held back until it is known not to be one, so a client never sees part of a stop string.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Decodes a growing id list with a small sliding window instead of re-decoding everything each step."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


class StopMatcher:
    """Accumulates text; releases what can safely be shown and reports the first stop string seen."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add ``text``; return the part that may be released now (everything before a stop string, if one hit)."""
        if self.stopped or not text:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._partial_suffix()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        """At the end of generation what was held back is plain text after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:size]):
                    best = size
                    break
        return best
