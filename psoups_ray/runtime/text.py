"""A row's text as it is decoded: incremental detokenisation, stop strings, streamed deltas.

A response's text is the decode of its tokens (special tokens skipped), stripped of leading
and trailing whitespace, cut before the first stop string. Streaming emits that text piece
by piece: :class:`RowText` decodes only the last few tokens at each step (the prefix/read
offsets of Hugging Face's text-generation-inference), holds back trailing whitespace (the
final text drops it) and any tail that may be the start of a stop string, so the pieces
joined are the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # an incomplete UTF-8 sequence decodes to this: wait for more tokens


def final_text(tokenizer, token_ids: Sequence[int], stop: Sequence[str] = ()) -> tuple[str, bool]:
    """(text, whether a stop string cut it) of a finished row's tokens (no EOS)."""
    return visible_text(tokenizer.decode(list(token_ids), skip_special_tokens=True), stop, True)


def visible_text(decoded: str, stop: Sequence[str], final: bool) -> tuple[str, bool]:
    """The response text of ``decoded``: stripped (on the left only until ``final``), cut
    before the first stop string. Returns (text, stopped)."""
    text = decoded.lstrip()
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    stopped = cut >= 0
    if stopped:
        text = text[:cut]
    return (text.rstrip() if final or stopped else text), stopped


class RowText:
    """One row's decoded text, extended token by token."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.decoded = ""  # the text of every token so far
        self.streamed = ""  # the visible text already returned
        self._prefix_offset = 0
        self._read_offset = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Append one token; returns whether the text now holds a stop string."""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self._prefix_offset : self._read_offset],
                        skip_special_tokens=True)  # fmt: skip
        new = decode(self.tokens[self._prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith(REPLACEMENT):
            self.decoded += new[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
        return bool(self.stop) and visible_text(self.decoded, self.stop, False)[1]

    def delta(self) -> str:
        """The text that is safe to stream now and was not yet returned."""
        text, stopped = visible_text(self.decoded, self.stop, False)
        if stopped:  # the row finishes: its final text comes with :meth:`finish`
            return ""
        ready = len(text.rstrip())
        if self.stop:
            ready = min(ready, len(text) - self._hold)
        return self._take(text, ready)

    def finish(self, final: str) -> str:
        """The rest of ``final``, the row's final text, after what was streamed (empty in the
        rare case where a tokenizer decodes a sequence differently from its pieces)."""
        if not final.startswith(self.streamed):
            return ""
        return self._take(final, len(final))

    def _take(self, text: str, ready: int) -> str:
        if ready <= len(self.streamed):
            return ""
        piece = text[len(self.streamed) : ready]
        self.streamed += piece
        return piece
