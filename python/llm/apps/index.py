"""The retrieval index: a folder that loads without re-reading or re-embedding anything.

    INDEX/manifest.json     format, tokenizer and chunk sizes, documents, retrievers, embedder identity
    INDEX/chunks.jsonl      one chunk a line: source, start, end, text
    INDEX/bm25/             the lexical index (bm25s), always
    INDEX/embeddings.npy    (chunks, dimension) unit vectors, when built with an embedder

Retrievers: "bm25" ranks by term overlap (BM25, Lucene's variant, English stop words
dropped); "dense" by cosine similarity of sentence embeddings; "hybrid" fuses both rankings
by reciprocal rank (score = sum over rankings of 1 / (60 + rank)), which needs no calibration
between two unrelated score scales. "auto" is hybrid when the index has embeddings, else bm25.

Each hit carries its `relevance`, the number the "do I know this?" threshold reads: the BM25
score for bm25, the cosine similarity for dense and hybrid.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.apps.chunking import Chunk, Document, chunk_documents
from llm.apps.embedders import SentenceEmbedder
from llm.tokenizer import get_tokenizer

FORMAT = 1
RETRIEVERS = ("auto", "bm25", "dense", "hybrid")
CHUNK_TOKENIZER = "gpt2"  # what chunk sizes are counted in, whatever model answers
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
# The relevance below which retrieval found nothing useful, per retriever (see llm-rag eval).
DEFAULT_MIN_RELEVANCE = {"bm25": 3.0, "dense": 0.3, "hybrid": 0.3}


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    chunk_id: int
    rank: int  # 1 = best
    score: float  # what ranked it: BM25 score, cosine, or fused reciprocal rank
    relevance: float  # what the threshold reads: BM25 score (bm25) or cosine (dense, hybrid)

    def summary(self) -> dict:
        """What the application log and API responses show: the citation, not the text."""
        c = self.chunk
        return {"rank": self.rank, "source": c.source, "start": c.start, "end": c.end,
                "score": round(self.score, 4), "relevance": round(self.relevance, 4)}  # fmt: skip


def bm25s_module():
    """The bm25s package, or a one-line error saying how to install it."""
    try:
        import bm25s
    except ImportError:
        raise ValueError("retrieval needs bm25s: pip install 'llmkernels[apps]'") from None
    return bm25s


def _bm25_tokens(texts: list[str]):
    return bm25s_module().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class RetrievalIndex:
    def __init__(self, chunks: list[Chunk], manifest: dict, bm25, embeddings: np.ndarray | None = None,
                 embedder: SentenceEmbedder | None = None):  # fmt: skip
        self.chunks, self.manifest, self.bm25 = chunks, manifest, bm25
        self.embeddings, self.embedder = embeddings, embedder
        self.path: Path | None = None

    @classmethod
    def build(cls, documents: list[Document], chunk_tokens: int, overlap_tokens: int,
              embedder: SentenceEmbedder | None = None, show_progress: bool = False) -> RetrievalIndex:  # fmt: skip
        bm25s = bm25s_module()
        chunks = chunk_documents(documents, get_tokenizer(CHUNK_TOKENIZER), chunk_tokens, overlap_tokens)
        texts = [c.text for c in chunks]
        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        embeddings = embedder.embed(texts, show_progress) if embedder else None
        manifest = {
            "format": FORMAT, "tokenizer": CHUNK_TOKENIZER, "chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens,
            "documents": [{"source": d.source, "chars": len(d.text)} for d in documents], "chunks": len(chunks),
            "retrievers": ["bm25"] + (["dense"] if embedder else []),
            "embedder": embedder.identity() if embedder else None,
        }  # fmt: skip
        return cls(chunks, manifest, bm25, embeddings, embedder)

    @staticmethod
    def check_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
        """Raise unless save(path, overwrite) may write there: nothing there yet, or with
        `overwrite` an index (never another folder)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or another --out")
        if path.exists() and not (path / "manifest.json").is_file():
            raise ValueError(f"{path} exists and is not an index; refusing to replace it")

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the folder beside its destination, then move it in: never half an index at `path`."""
        path = Path(path)
        self.check_destination(path, overwrite)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            self.bm25.save(str(staging / "bm25"), show_progress=False)
            with open(staging / "chunks.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(c.to_dict()) + "\n" for c in self.chunks)
            if self.embeddings is not None:
                np.save(staging / "embeddings.npy", self.embeddings)
            (staging / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: str | None = None) -> RetrievalIndex:
        """The saved index; `embedder` (a model folder or id) must be the one it was built with."""
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"no index at {path} (build one with: llm-rag index DOCS --out {path})")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            chunks = [Chunk(**json.loads(line)) for line in (path / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
            bm25 = bm25s_module().BM25.load(str(path / "bm25"), show_progress=False)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"index {path} is damaged ({type(error).__name__}: {error}); rebuild it") from None
        if manifest.get("format") != FORMAT or len(chunks) != manifest.get("chunks"):
            raise ValueError(f"index {path} is damaged or from another version; rebuild it")
        recorded, model, embeddings = manifest.get("embedder"), None, None
        if embedder and not recorded:
            raise ValueError(f"--embedder: index {path} was built without embeddings (BM25 only); "
                             "rebuild it with --embedder to search by meaning")
        if recorded:
            embeddings = np.load(path / "embeddings.npy", allow_pickle=False)
            model = SentenceEmbedder(embedder or recorded["name"])
            model.check_identity(recorded, path)
        index = cls(chunks, manifest, bm25, embeddings, model)
        index.path = path
        return index

    def resolve_retriever(self, retriever: str) -> str:
        if retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")
        if retriever == "auto":
            return "hybrid" if self.embeddings is not None else "bm25"
        if retriever in ("dense", "hybrid") and self.embeddings is None:
            raise ValueError(f"--retriever {retriever}: the index has no embeddings; build it with --embedder")
        return retriever

    def search(self, query: str, k: int = 5, retriever: str = "auto") -> list[Hit]:
        """The k best chunks for `query`, best first."""
        retriever = self.resolve_retriever(retriever)
        k = min(k, len(self.chunks))
        if retriever == "bm25":
            ids, scores = self._bm25(query, k)
            return [Hit(self.chunks[i], i, rank, s, s) for rank, (i, s) in enumerate(zip(ids, scores), start=1)]
        cosines = self.embeddings @ self.embedder.embed([query])[0]  # (N,)
        dense_ids = np.argsort(-cosines, kind="stable")[: k if retriever == "dense" else 4 * k].tolist()
        if retriever == "dense":
            return [Hit(self.chunks[i], i, r, float(cosines[i]), float(cosines[i])) for r, i in enumerate(dense_ids, 1)]
        fused: dict[int, float] = {}
        for ranking in (self._bm25(query, 4 * k)[0], dense_ids):
            for rank, i in enumerate(ranking, start=1):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [Hit(self.chunks[i], i, r, fused[i], float(cosines[i])) for r, i in enumerate(best, start=1)]

    def _bm25(self, query: str, k: int) -> tuple[list[int], list[float]]:
        """Chunk ids and BM25 scores, best first; chunks sharing no term with the query are left out."""
        ids, scores = self.bm25.retrieve(_bm25_tokens([query]), k=min(k, len(self.chunks)), show_progress=False)
        kept = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]
        return [i for i, _ in kept], [s for _, s in kept]
