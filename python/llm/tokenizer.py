"""Byte-level BPE tokenizers served by tiktoken, offline.

- `gpt2_tokenizer()`: GPT-2's own tokenizer (exact ids), from the ranks shipped in
  llm/assets/gpt2.tiktoken.
- `train_bpe(texts, vocab_size)`: learn a byte-level BPE on your own corpus; the
  learned merges become tiktoken ranks, so encoding runs at tiktoken's speed.
- `save_tokenizer` / `load_tokenizer`: a small JSON file (written atomically).
- `tokenizer_to_dict` / `tokenizer_from_dict`: the same description as plain types,
  so checkpoints carry their tokenizer.

It reads no corpus files; the `llm-tokenizer` command that learns a BPE on files is
llm.tokenizer_cli (above llm.data, which reads them).
"""

from __future__ import annotations

import base64
import collections
import functools
import heapq
import json
import os
from pathlib import Path

import regex
import tiktoken
import tiktoken.load

from llm.cli import int_in
from llm.files import atomic_output

ASSETS = Path(__file__).parent / "assets"
END_OF_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer: BPE never merges across these chunks (contractions, runs of
# letters, digits, other symbols, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


VOCAB_SIZES = int_in(257, 2**20)  # 256 bytes + <|endoftext|> at least; ids fit uint32 token files
MIN_VOCAB_SIZE, MAX_VOCAB_SIZE = VOCAB_SIZES.minimum, VOCAB_SIZES.maximum
LEARNED_PREFIX = "bpe:"


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer: "Hello, world" -> [15496, 11, 995], <|endoftext|> = 50256."""
    # 50,256 byte-level ranks, so <|endoftext|> lands on 50256 as in every learned BPE here.
    return _encoding("gpt2", tiktoken.load.load_tiktoken_bpe(str(ASSETS / "gpt2.tiktoken")))


def train_bpe(texts: list[str], vocab_size: int, name: str = "bpe") -> tiktoken.Encoding:
    """Learn vocab_size - 257 merges on top of the 256 bytes; <|endoftext|> is the last id.

    Classic BPE: split the text into GPT-2 pre-tokenizer chunks, count each distinct
    chunk once with its frequency, then repeatedly merge the most frequent adjacent pair
    of tokens. Pair counts are updated only for the chunks that contain the merged pair.
    Ties go to the smaller pair of byte strings, so training is deterministic.
    """
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT}) and at most "
            f"{MAX_VOCAB_SIZE}, got {vocab_size}"
        )
    chunk_counts = collections.Counter(
        chunk.encode("utf-8") for text in texts for chunk in regex.findall(GPT2_PATTERN, text)
    )
    if not chunk_counts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    words = [[bytes([b]) for b in chunk] for chunk in chunk_counts]  # each chunk as a list of tokens
    freqs = list(chunk_counts.values())

    pair_counts: collections.Counter = collections.Counter()
    words_with_pair = collections.defaultdict(set)  # pair -> indices of the words containing it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            words_with_pair[pair].add(i)

    # Max-heap of (-count, pair). Entries go stale when a count changes; a fresh entry
    # is pushed then, and stale ones are skipped when they surface.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1 and heap:
        negative_count, best = heapq.heappop(heap)
        if pair_counts.get(best) != -negative_count:
            continue  # stale
        if -negative_count < 2:
            break  # nothing repeats any more; a merge would just memorise one chunk
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        del pair_counts[best]
        changed = set()
        for i in words_with_pair.pop(best):
            word = words[i]
            for pair in zip(word, word[1:]):  # forget this word's old pairs ...
                if pair != best:
                    pair_counts[pair] -= freqs[i]
                    changed.add(pair)
            new_word, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    new_word.append(merged)
                    j += 2
                else:
                    new_word.append(word[j])
                    j += 1
            words[i] = new_word
            for pair in zip(new_word, new_word[1:]):  # ... and count its new ones
                pair_counts[pair] += freqs[i]
                words_with_pair[pair].add(i)
                changed.add(pair)
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
    return _encoding(name, ranks)


def _encoding(name: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """A byte-level BPE with GPT-2's pre-tokenizer and <|endoftext|> as the last id."""
    return tiktoken.Encoding(
        name=name,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )


def tokenizer_to_dict(enc: tiktoken.Encoding) -> dict:
    """Plain-type description: {"name": "gpt2"} for GPT-2, else the learned ranks."""
    if enc is gpt2_tokenizer():
        return {"name": "gpt2"}
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in ranks] != list(range(len(ranks))):
        raise ValueError(f"tokenizer {enc.name!r} has non-contiguous ranks; cannot save it")
    return {"name": enc.name, "tokens": [base64.b64encode(token).decode("ascii") for token, _ in ranks]}


def tokenizer_from_dict(description: dict) -> tiktoken.Encoding:
    if description.get("name") == "gpt2" and "tokens" not in description:
        return gpt2_tokenizer()
    try:
        tokens = [base64.b64decode(token) for token in description["tokens"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed tokenizer description ({error!r})") from error
    return _encoding(description["name"], {token: rank for rank, token in enumerate(tokens)})


def save_tokenizer(enc: tiktoken.Encoding, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(tokenizer_to_dict(enc)))


def load_tokenizer(path: str | os.PathLike) -> tiktoken.Encoding:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        description = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read tokenizer file {path}: {error}") from None
    if not isinstance(description, dict):
        raise ValueError(f"cannot read tokenizer file {path}: expected a JSON object written by save_tokenizer")
    return tokenizer_from_dict(description)


def get_tokenizer(spec: str) -> tiktoken.Encoding:
    """"gpt2" or the path of a tokenizer saved with save_tokenizer."""
    return gpt2_tokenizer() if spec == "gpt2" else load_tokenizer(spec)


def check_tokenizer_spec(spec: str, learnable: bool = True) -> str:
    """spec itself if it names a tokenizer: "gpt2", a tokenizer file, or (if learnable)
    "bpe:N", N tokens learned on the corpus; else a ValueError saying what is accepted."""
    accepted = '"gpt2", "bpe:N" (N an integer >= 257) or a tokenizer file' if learnable else '"gpt2" or a tokenizer file'
    if spec == "gpt2" or Path(spec).expanduser().is_file():
        return spec
    if learnable and spec.startswith(LEARNED_PREFIX):
        size = spec.removeprefix(LEARNED_PREFIX)
        if size.isdigit() and VOCAB_SIZES.contains(int(size)):
            return spec
        raise ValueError(f"{spec!r}: N in bpe:N must be {VOCAB_SIZES.expected}")
    if Path(spec).expanduser().is_dir():
        raise ValueError(f"{spec} is a folder; expected {accepted}")
    raise ValueError(f"{spec!r} is not {accepted}: no such file")
