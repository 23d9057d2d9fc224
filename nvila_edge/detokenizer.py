"""Incremental detokenization for streaming: emits text as soon as it is final (whole UTF-8 characters,
and not possibly the start of a stop string)."""

from __future__ import annotations

from typing import Sequence


class StreamDecoder:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (complete characters only)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text ("" when it is still pending)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        self.text = text
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:cut]
                self.stopped = True
                return self._take(len(self.text))
            hold = max((_overlap(text, s) for s in self.stop), default=0)
            return self._take(len(text) - hold)
        return self._take(len(text))

    def flush(self) -> str:
        """Remaining held-back text at the end of generation."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
