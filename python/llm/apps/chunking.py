"""Documents -> chunks of tokens with overlap; each chunk keeps its source and where it
came from, so an answer can cite it and a reader can check it.

    documents = read_documents(["notes/", "*.md"])       # files, folders, globs
    chunks = chunk_documents(documents, tokenizer, chunk_tokens=128, overlap_tokens=32)
    chunks[0].text == documents[0].text[chunks[0].start : chunks[0].end]

Chunks are cut on token boundaries (every chunk_tokens - overlap_tokens tokens a new one
starts), and start/end are character offsets into the source text. Files are read as UTF-8,
strictly (llm.files.read_utf8): a file that is not text is refused with its name, not silently
garbled. A .gz file is decompressed first (the built-in corpus is gzipped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import tiktoken

from llm.cli import int_in
from llm.data import default_corpus, resolve_sources
from llm.files import read_utf8

CHUNK_TOKENS = int_in(8, 4096)
DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS = 128, 32


@dataclass(frozen=True)
class Document:
    source: str  # the path as given (or the built-in file's name)
    text: str


@dataclass(frozen=True)
class Chunk:
    source: str
    start: int  # character offsets into the source's text
    end: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def read_documents(sources: list[str] | None) -> list[Document]:
    """The documents named by paths, globs or folders; none = the built-in Shakespeare corpus."""
    paths = resolve_sources(sources) if sources else default_corpus()
    documents = [Document(path.name if not sources else str(path), read_utf8(path)) for path in paths]
    empty = [d.source for d in documents if not d.text.strip()]
    if empty:
        raise ValueError(f"empty document(s): {', '.join(empty[:5])}; nothing to index there")
    return documents


def chunk_text(text: str, tokenizer: tiktoken.Encoding, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               overlap_tokens: int = DEFAULT_OVERLAP_TOKENS) -> list[tuple[int, int]]:
    """(start, end) character offsets of the chunks of `text`: windows of chunk_tokens tokens,
    consecutive windows sharing overlap_tokens tokens; the last window ends at the text's end."""
    CHUNK_TOKENS.check("chunk_tokens", chunk_tokens)
    if not (isinstance(overlap_tokens, int) and 0 <= overlap_tokens < chunk_tokens):
        raise ValueError(f"overlap_tokens must be an integer in [0, chunk_tokens={chunk_tokens}), got {overlap_tokens!r}")
    ids = tokenizer.encode_ordinary(text)
    # Byte offset of every token boundary, then the character each byte offset falls in: a
    # token can end inside a multi-byte character, whose bytes then go to the next chunk.
    token_bytes = np.fromiter((len(b) for b in tokenizer.decode_tokens_bytes(ids)), dtype=np.int64, count=len(ids))
    byte_offsets = np.concatenate([[0], np.cumsum(token_bytes)])  # (n + 1,)
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    starts_char = (raw & 0xC0) != 0x80  # the first byte of each character
    chars_before = np.concatenate([[0], np.cumsum(starts_char)])  # bytes -> characters that start before
    stride = chunk_tokens - overlap_tokens
    spans = []
    for first in range(0, max(1, len(ids) - overlap_tokens), stride):
        last = min(first + chunk_tokens, len(ids))
        start, end = int(chars_before[byte_offsets[first]]), int(chars_before[byte_offsets[last]])
        if end > start:
            spans.append((start, end))
    return spans


def chunk_documents(documents: list[Document], tokenizer: tiktoken.Encoding, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS) -> list[Chunk]:
    return [Chunk(d.source, start, end, d.text[start:end])
            for d in documents for start, end in chunk_text(d.text, tokenizer, chunk_tokens, overlap_tokens)]  # fmt: skip
