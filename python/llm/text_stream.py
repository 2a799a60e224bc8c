"""Token ids -> text as it is generated: whole UTF-8 characters only, stop sequences cut
(llm-generate --stream, llm-serve).

A byte-level BPE token can end in the middle of a UTF-8 character, and a stop sequence
can span several tokens, so text is released only once it is final: complete characters
that cannot be the start of a stop sequence. The rest waits for the next token.
"""

from __future__ import annotations

import codecs

import tiktoken


class TextStream:
    def __init__(self, tokenizer: tiktoken.Encoding, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet released (it may begin a stop sequence)
        self.text = ""  # released so far
        self.stopped = False  # a stop sequence was found; nothing more is released

    def push(self, token: int) -> str:
        """Add one generated token; return the text it makes final ("" if none yet)."""
        self.pending += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self.pending) - self._held_back())

    def finish(self) -> str:
        """The text still held back, once generation ended without a stop sequence."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)  # a cut-off character becomes U+FFFD
        return self._release(len(self.pending))

    def _held_back(self) -> int:
        """Length of the longest end of `pending` that is the start of a stop sequence."""
        return max(
            (n for s in self.stop for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
             if self.pending.endswith(s[:n])),
            default=0,
        )

    def _release(self, end: int) -> str:
        released, self.pending = self.pending[:end], self.pending[end:]
        self.text += released
        return released
