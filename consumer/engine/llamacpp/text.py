"""The text of one generation as its tokens arrive: what may be streamed now, and where it stops.

Pure: token bytes in, text out. Three things are held back from the stream until they are
settled: an incomplete UTF-8 character (a token may end mid-character), and text that may be
the start of a stop string (a stop string may span tokens). Nothing from a stop string on is
ever streamed or returned.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class TextStream:
    """Decodes a generation's token pieces incrementally and finds its stop strings.

    `feed` each token's bytes and stream what it returns; `finish` when generation ends for
    another reason (end of turn, length) and stream what it returns too. The concatenation of
    everything returned equals `text`, the reply.
    """

    def __init__(self, stop: Iterable[str] = ()) -> None:
        self._stops = tuple(s for s in stop if s)
        # Invalid bytes are dropped and an incomplete tail at the end too, like llama-cpp-python's
        # create_completion (errors="ignore"); an incomplete tail mid-stream waits for more bytes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._text = ""  # decoded so far, held text included (cut at a stop string)
        self._released = 0  # characters of _text already returned
        self.stopped = False  # a stop string was found; nothing more is taken

    @property
    def text(self) -> str:
        """The reply so far: everything decoded, cut before a stop string."""
        return self._text

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; returns the new text that can be streamed now."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(piece)
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            self._text = self._text[:cut]
            return self._release(cut)
        return self._release(len(self._text) - self._held())

    def finish(self) -> str:
        """Generation ended without a stop string: release everything held."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
            self.stopped = True
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        delta = self._text[self._released : end]
        self._released = max(self._released, end)
        return delta

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts in the unreleased text, if one is there.

        A stop string can only start in the unreleased text: whatever could begin one was held.
        """
        found: int | None = None
        for stop in self._stops:
            at = self._text.find(stop, self._released)
            if at >= 0 and (found is None or at < found):
                found = at
        return found

    def _held(self) -> int:
        """Length of the longest tail of the unreleased text that begins some stop string."""
        pending = len(self._text) - self._released
        held = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, pending), held, -1):
                if self._text.endswith(stop[:size]):
                    held = size
                    break
        return held
