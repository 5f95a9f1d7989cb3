"""One request's generation as text pieces: tokens decoded incrementally, cut at stop strings.

`answer` runs on a worker thread of the server; it is plain Python (no HTTP, no Ray), so the
text a client sees, streamed or not, comes from the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from trainer.serve.backend import Backend, Sampling


@dataclass(frozen=True)
class Started:
    version: str  # the version that answers this request, start to end


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    completion_tokens: int


Event = Started | Piece | Finished


def answer(backend: Backend, prompt: list[int], sampling: Sampling, *, stop: Sequence[str],
           cancelled: threading.Event) -> Iterator[Event]:
    """Started, then the new text in pieces, then Finished. Setting `cancelled` (the client
    went away) ends the generation after the current token."""
    with backend.session() as session:
        yield Started(session.version)
        text, stops = TextStream(backend.tokenizer), StopText(stop)
        count, reason, stopped = 0, "length", False
        for token in session.tokens(prompt, sampling, cancelled=cancelled):
            count += 1
            if token in session.eos:
                reason = "stop"
                break
            piece, stopped = stops.feed(text.push(token))
            if piece:
                yield Piece(piece)
            if stopped:
                reason = "stop"
                break
            if cancelled.is_set():
                return
        if not stopped:  # what was held back: an unfinished character, a stop's first letters
            piece, stopped = stops.feed(text.flush())
            rest = piece if stopped else piece + stops.flush()
            if rest:
                yield Piece(rest)
            reason = "stop" if stopped else reason
        yield Finished(reason, count)


class TextStream:
    """Token ids to text, piece by piece: decoding the whole answer each time keeps pieces
    right where a token's text depends on its neighbours, and a piece that ends inside a
    multi-byte character waits for the token that completes it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._new(text)

    def flush(self) -> str:
        return self._new(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _new(self, text: str) -> str:
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece


class StopText:
    """Cuts text at the first stop string (which is not returned, as in OpenAI's API),
    holding back a tail that might be the start of one until the next piece decides it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was found)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = self._tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
