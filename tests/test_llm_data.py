"""llm.data: corpus sources, cached token files, document split, batches."""

import gzip
import json

import numpy as np
import pytest
import torch

from llm.data import (
    BatchLoader, TokenWindows, default_corpus, prepare_data, read_document, resolve_sources, split_documents,
)  # fmt: skip
from llm.tokenizer import gpt2_tokenizer


def write_corpus(folder, count=5, words=300):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(words)))
    return folder


def test_default_corpus_is_shipped():
    plays = default_corpus()
    assert len(plays) == 42
    assert any(p.name == "hamlet.txt.gz" for p in plays)
    assert sum(p.stat().st_size for p in plays) < 3e6


def test_sources_globs_and_errors(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    assert len(resolve_sources([str(corpus)])) == 5
    assert len(resolve_sources([str(corpus / "doc[0-2].txt")])) == 3
    with pytest.raises(ValueError, match="matches no file"):
        resolve_sources([str(tmp_path / "missing*.txt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare_data([str(empty)], gpt2_tokenizer(), tmp_path / "cache")


def test_document_split_is_deterministic():
    assert split_documents(42, 0.1) == [5, 15, 26, 36]
    assert split_documents(5, 0.1) == [2]
    assert split_documents(1, 0.1) == []


def test_prepare_data_caches_atomically(tmp_path):
    corpus = write_corpus(tmp_path / "c", count=10)
    enc = gpt2_tokenizer()
    meta = prepare_data([str(corpus)], enc, tmp_path / "cache")
    assert meta["val_documents"] == ["doc5.txt"]
    train = np.fromfile(f"{meta['dir']}/train.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and train[-1] == enc.eot_token
    assert json.loads(open(f"{meta['dir']}/meta.json").read())["dtype"] == "uint16"
    assert prepare_data([str(corpus)], enc, tmp_path / "cache") == meta  # cache hit
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_single_document_holds_out_its_tail(tmp_path):
    (tmp_path / "one.txt").write_text("abc " * 1000)
    meta = prepare_data([str(tmp_path / "one.txt")], gpt2_tokenizer(), tmp_path / "cache", val_fraction=0.2)
    assert meta["val_tokens"] > 0 and meta["train_tokens"] > 3 * meta["val_tokens"]


def test_windows_and_loader(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    windows = TokenWindows(tmp_path / "t.bin", "uint16", context_length=16, stride=8)
    assert windows.num_windows == (1000 - 17) // 8 + 1
    x, y = windows.batch([0, 3])
    assert x.shape == (2, 16) and x.dtype == torch.int64
    assert torch.equal(x[1], torch.arange(24, 40)) and torch.equal(y[1], torch.arange(25, 41))

    loader = BatchLoader(windows, batch_size=4, seed=0)
    first = [loader.next_batch()[0] for _ in range(3)]
    state = loader.state_dict()
    after = loader.next_batch()[0]
    resumed = BatchLoader(windows, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()[0], after)
    # rank sharding: two ranks together see the single-process batches of 2x... split in halves
    rank0, rank1 = (BatchLoader(windows, batch_size=2, seed=0, rank=r, world_size=2) for r in (0, 1))
    assert torch.equal(torch.cat([rank0.next_batch()[0], rank1.next_batch()[0]]), first[0])

    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(tmp_path / "t.bin", "uint16", context_length=1000, stride=1)


def test_binary_or_non_utf8_text_is_refused_with_the_file_and_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"looks like text\x00\x89PNG")
    (tmp_path / "ok.txt.gz").write_bytes(gzip.compress("na\u00efve caf\u00e9 \u2014 fine".encode()))
    for name, message in [("latin1.txt", r"latin1.txt: not UTF-8 text: byte 2 \(0xef\) invalid continuation byte"),
                          ("blob.txt", r"blob.txt: byte 15 is a NUL byte: a binary file, not text")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            prepare_data([str(tmp_path / name)], gpt2_tokenizer(), tmp_path / "cache")
    assert read_document(tmp_path / "ok.txt.gz") == "na\u00efve caf\u00e9 \u2014 fine"
