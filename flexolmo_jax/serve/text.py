"""Generated tokens to text as they come: whole characters only, and cut at a stop string.

A byte-level or BPE vocabulary can split one character over several tokens, so text is decoded
from all tokens so far and a trailing incomplete character (U+FFFD) is held back. A stop string
may also arrive in pieces, so a stream holds back as many characters as could start one.
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
  """Feed it tokens; it returns the text that is safe to send, and says when a stop string ends
  the completion (the stop string itself is never sent)."""

  def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (),
               eos_id: int | None = None):
    self.decode, self.stop, self.eos_id = decode, tuple(s for s in stop if s), eos_id
    self.tokens: list[int] = []
    self.sent = 0              # characters of the text already returned
    self.stopped = False

  def text(self) -> str:
    return self.decode([t for t in self.tokens if t != self.eos_id])

  def extend(self, tokens) -> None:
    """Takes tokens without sending anything (a completion read whole at its end)."""
    self.tokens.extend(tokens)

  def push(self, token: int) -> str:
    """The new text that ``token`` makes safe to send."""
    if self.stopped:
      return ""
    self.tokens.append(token)
    text = self.text()
    cut = self._stop_at(text)
    if cut is not None:
      self.stopped = True
      return self._advance(text[:cut])
    hold = max((len(s) - 1 for s in self.stop), default=0)
    end = len(text) - hold
    while end > self.sent and text[end - 1] == REPLACEMENT:
      end -= 1
    return self._advance(text[:max(end, self.sent)])

  def finish(self) -> str:
    """The rest of the text at the end of the completion (held-back characters included)."""
    if self.stopped:
      return ""
    text = self.text()
    cut = self._stop_at(text)
    return self._advance(text if cut is None else text[:cut])

  def _stop_at(self, text: str) -> int | None:
    found = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop)
             if i >= 0]
    return min(found) if found else None

  def _advance(self, text: str) -> str:
    new = text[self.sent:]
    self.sent = max(self.sent, len(text))
    return new
