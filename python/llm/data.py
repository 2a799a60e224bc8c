"""Corpus -> cached token files -> batches of sliding windows.

1. `resolve_sources`: the built-in Shakespeare corpus, or your files / globs / folders.
2. `prepare_data`: tokenise once, split whole documents into train and val, and write
   train.bin / val.bin (flat token ids, uint16 when the vocabulary fits) plus meta.json
   into a cache folder named after the content and the tokenizer. Written atomically,
   meta.json last, so a half-finished run is never mistaken for a cache hit.
3. `TokenWindows`: memory-mapped view of a .bin file as windows of context_length + 1
   tokens, one every `stride` tokens (inputs x and next-token targets y).
4. `BatchLoader`: shuffled batches of windows, sharded by rank, resumable from its
   state_dict (epoch and batch index).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tiktoken
import torch

from llm.files import atomic_output
from llm.tokenizer import load_tokenizer, save_tokenizer, tokenizer_to_dict, train_bpe

DEFAULT_CORPUS_DIR = Path(__file__).parent / "assets" / "shakespeare"
DEFAULT_DATA_DIR = Path("~/.cache/llm").expanduser()


def default_corpus() -> list[Path]:
    """Shakespeare's 37 plays and 5 poems (Project Gutenberg, public domain), gzipped."""
    return sorted(DEFAULT_CORPUS_DIR.glob("*.txt.gz"))


def resolve_sources(sources: list[str] | None) -> list[Path]:
    """Files named by paths, glob patterns or folders (all files inside), sorted and
    deduplicated. None or [] means the built-in corpus."""
    if not sources:
        return default_corpus()
    paths: set[Path] = set()
    for source in sources:
        source = os.path.expanduser(source)
        matches = [Path(m) for m in glob.glob(source, recursive=True)] or [Path(source)]
        for match in matches:
            if match.is_dir():
                paths.update(p for p in match.rglob("*") if p.is_file() and not p.name.startswith("."))
            elif match.is_file():
                paths.add(match)
            else:
                raise ValueError(f"data source {source!r} matches no file or folder")
    if not paths:
        raise ValueError(f"data sources {sources} contain no files")
    return sorted(paths)


def read_document(path: Path) -> str:
    """A UTF-8 text file as a string (.gz decompressed). A binary file or text in another
    encoding is refused, naming the file and the first bad byte's offset (in the decompressed
    text for .gz), rather than trained on as replacement characters."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    nul = raw.find(b"\0")
    if nul != -1:
        raise ValueError(f"{path}: byte {nul} is a NUL byte: a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text: byte {error.start} ({raw[error.start]:#04x}) {error.reason}; convert it "
            f"first, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
        ) from None


def split_documents(num_documents: int, val_fraction: float) -> list[int]:
    """Indices of the documents that go to validation: round(n * val_fraction) of them
    (at least one), spread evenly through the sorted list. Deterministic."""
    if num_documents < 2 or val_fraction <= 0:
        return []
    num_val = min(num_documents - 1, max(1, round(num_documents * val_fraction)))
    return sorted({int((k + 0.5) * num_documents / num_val) for k in range(num_val)})


def prepare_data(
    sources: list[str] | None,
    tokenizer: tiktoken.Encoding,
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    val_fraction: float = 0.1,
) -> dict:
    """Tokenise the corpus into data_dir (once; later calls find the cache).

    Returns meta: {"dir", "dtype", "train_tokens", "val_tokens", "train_documents",
    "val_documents", ...}. Documents are separated by <|endoftext|>. Whole documents go
    to validation (see split_documents); a single document is split at its last
    val_fraction of tokens instead.
    """
    paths = resolve_sources(sources)
    key = corpus_digest(paths, [tokenizer_to_dict(tokenizer), val_fraction])
    cache = Path(data_dir).expanduser() / f"{tokenizer.name}-{key}"
    if (cache / "meta.json").exists():
        meta = json.loads((cache / "meta.json").read_text())
        return {**meta, "dir": str(cache)}

    texts = [read_document(p) for p in paths]
    if not any(text.strip() for text in texts):
        raise ValueError(f"the corpus is empty: {len(paths)} file(s) with no text ({paths[0]} ...)")
    eot = tokenizer.eot_token
    # One list of ids per document; the batch call encodes the documents on several threads.
    docs = [ids + [eot] for ids in tokenizer.encode_ordinary_batch(texts)]
    val_ids = split_documents(len(docs), val_fraction)
    train = [tok for i, doc in enumerate(docs) if i not in val_ids for tok in doc]
    val = [tok for i in val_ids for tok in docs[i]]
    if not val_ids:  # one document: hold out its tail
        cut = int(len(train) * (1 - val_fraction))
        train, val = train[:cut], train[cut:]

    dtype = np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32
    for split, tokens in (("train", train), ("val", val)):
        with atomic_output(cache / f"{split}.bin") as tmp:
            np.asarray(tokens, dtype=dtype).tofile(tmp)
    meta = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.n_vocab,
        "dtype": np.dtype(dtype).name,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "train_documents": [p.name for i, p in enumerate(paths) if i not in val_ids],
        "val_documents": [paths[i].name for i in val_ids],
    }
    with atomic_output(cache / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return {**meta, "dir": str(cache)}


def corpus_digest(paths: list[Path], settings) -> str:
    """16 hex digits naming a cache entry: file names, file contents and settings."""
    key = hashlib.sha256(json.dumps(settings).encode())
    for path in paths:
        key.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return key.hexdigest()[:16]


def corpus_tokenizer(
    sources: list[str] | None,
    vocab_size: int,
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    val_fraction: float = 0.1,
) -> tiktoken.Encoding:
    """A byte-level BPE of vocab_size tokens learned on the corpus's training documents
    (validation documents, as split_documents picks them, are left out). Learned once,
    then loaded from data_dir."""
    paths = resolve_sources(sources)
    key = corpus_digest(paths, ["bpe", vocab_size, val_fraction])
    path = Path(data_dir).expanduser() / f"bpe{vocab_size}-{key}.json"
    if path.exists():
        return load_tokenizer(path)
    val_ids = split_documents(len(paths), val_fraction)
    texts = [read_document(p) for i, p in enumerate(paths) if i not in val_ids]
    if len(paths) == 1:  # one document: its tail is the validation text
        texts = [texts[0][: int(len(texts[0]) * (1 - val_fraction))]]
    if not any(text.strip() for text in texts):
        raise ValueError(f"the corpus is empty: {len(paths)} file(s) with no text ({paths[0]} ...)")
    tokenizer = train_bpe(texts, vocab_size, name=f"bpe{vocab_size}-{key[:8]}")
    save_tokenizer(tokenizer, path)
    return tokenizer


class TokenWindows:
    """Windows of context_length + 1 consecutive tokens from a token file, memory-mapped.

    Window i starts at token i * stride; x is its first context_length tokens and y the
    same shifted by one (the next-token targets).
    """

    def __init__(self, path: str | os.PathLike, dtype: str, context_length: int, stride: int):
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.context_length = context_length
        self.stride = stride
        if len(self.tokens) < context_length + 1:
            raise ValueError(
                f"{path} has {len(self.tokens)} tokens, fewer than one window of "
                f"context_length + 1 = {context_length + 1}; use more text or a shorter context"
            )
        self.num_windows = (len(self.tokens) - context_length - 1) // stride + 1

    def batch(self, window_indices, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (len(window_indices), context_length) int64 on `device`."""
        T = self.context_length
        starts = np.asarray(window_indices, dtype=np.int64) * self.stride  # (B,)
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        device = torch.device(device)
        if device.type == "cuda":  # page-locked memory lets the copy overlap with compute
            rows = rows.pin_memory().to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]  # x (B, T), y (B, T)

    def evaluation_indices(self, count: int) -> list[int]:
        """`count` windows spread evenly over the file (fixed, for comparable val losses)."""
        return np.linspace(0, self.num_windows - 1, count).round().astype(np.int64).tolist()


class BatchLoader:
    """Endless shuffled batches. Each epoch is a fresh permutation of the windows seeded
    with seed + epoch; a global batch is batch_size * world_size consecutive windows of it,
    of which this rank takes its slice. The position (epoch, batch) is all the state."""

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = windows.num_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"only {windows.num_windows} training windows, fewer than one global batch of "
                f"batch_size * world_size = {batch_size * world_size}; use more text or a smaller batch"
            )
        self.epoch, self.batch_index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.windows.num_windows, generator=generator)

    def next_batch(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        global_size = self.batch_size * self.world_size
        start = self.batch_index * global_size + self.rank * self.batch_size
        indices = self._order[start : start + self.batch_size]
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        return self.windows.batch(indices.numpy(), device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
        self._order = self._permutation(self.epoch)
