"""Model configuration: one dataclass and a table of named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # longest sequence the position embedding covers
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide evenly
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    qkv_bias: bool = True  # GPT-2 has biases on the query/key/value projection
    layer_norm_eps: float = 1e-5
    # Round the embedding/LM-head rows up to a multiple of this (64 or 128 gives
    # matmul-friendly shapes); the extra logits are sliced off, so they never
    # reach the loss or the sampler. 1 = no padding (exact GPT-2 parameter count).
    vocab_pad_multiple: int = 1
    # Route attention, LayerNorm, GELU and the training loss (LM head + cross-entropy)
    # through llmkernels (fused CUDA/Triton kernels where they run, llmkernels'
    # reference ops elsewhere).
    use_fused: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head", "vocab_pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.vocab_pad_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """The named preset with any field replaced, e.g. from_preset("gpt2", use_fused=True)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


PRESETS: dict[str, dict] = {
    # The four released GPT-2 sizes (124M, 350M, 774M, 1558M parameters).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Trains in a few minutes on a 2-core CPU (python -m llm.train), with a 2048-token
    # BPE learned on the corpus (see llm.train.PRESET_TOKENIZERS): 4 layers of width
    # 128, 128-token context, about 1.1M parameters.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, context_length=128, vocab_pad_multiple=64),
}
