"""Dense sentence embeddings through sentence-transformers, for retrieval by meaning.

A sentence embedder (e.g. all-MiniLM-L6-v2) is trained so that a question and the passage
answering it land close together; the GPT's own token embeddings are not (they encode one
token in context, not the meaning of a passage), so retrieval uses a separate model.

`--embedder` names a model folder (offline) or a Hugging Face id (downloaded once by
sentence-transformers). The index records the embedder's name, dimension and the embedding
of a fixed probe sentence; loading it with another model is refused, since vectors from two
models are not comparable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROBE = "A probe sentence that identifies the embedding model."
SAME_MODEL_COSINE = 0.999


class SentenceEmbedder:
    def __init__(self, spec: str):
        path = Path(spec).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--embedder {spec}: expected a sentence-transformers model folder or id, found a file")
        self.name = str(path.resolve()) if path.is_dir() else spec
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ValueError("--embedder needs sentence-transformers: pip install 'llmkernels[apps]'") from None
        try:
            self.model = SentenceTransformer(self.name, device="cpu")
        except Exception as error:  # a missing id or a folder that is not a model: many exception types
            raise ValueError(f"--embedder {spec}: cannot load a sentence-transformers model "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        self.dimension = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """texts -> (N, dimension) float32 rows of unit length (cosine = dot product)."""
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=show_progress)  # fmt: skip
        return vectors.astype(np.float32)

    def identity(self) -> dict:
        return {"name": self.name, "dimension": self.dimension, "probe": self.embed([PROBE])[0].round(6).tolist()}

    def check_identity(self, recorded: dict, index_path) -> None:
        """ValueError unless this is the model the index was built with."""
        same = self.dimension == recorded["dimension"] and float(
            np.dot(self.embed([PROBE])[0], np.asarray(recorded["probe"], dtype=np.float32))) >= SAME_MODEL_COSINE
        if not same:
            raise ValueError(f"--embedder {self.name} is not the model index {index_path} was built with "
                             f"({recorded['name']}, {recorded['dimension']} dimensions); rebuild the index or "
                             "use that embedder")
