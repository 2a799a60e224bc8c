"""GPT-2 in PyTorch, one concept per class.

Shapes: B = batch, T = tokens in this call, S = tokens attended to (cache + T),
C = n_embd, H = n_head, D = head_dim = C // H, V = vocab size (Vp when padded).

With `config.use_fused` the hot ops go through llmkernels (fused CUDA/Triton kernels
where they run, llmkernels' own reference elsewhere): attention, bias + GELU, each
residual add together with the LayerNorm after it (see GPT._blocks_and_final_norm), and
the training loss (LM head + cross-entropy, without the logits); otherwise the model uses
the plain PyTorch ops written here, its readable reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config import GPTConfig


def _llmkernels():
    # Imported on first use so that the plain PyTorch model works without llmkernels.
    import llmkernels

    return llmkernels


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with a learned scale and shift."""

    def __init__(self, n_embd: int, eps: float, use_fused: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps
        self.use_fused = use_fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused:
            return _llmkernels().layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def add_and_norm(self, branch: torch.Tensor, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream + branch, this LayerNorm of it), both (B, T, C): a residual add and the
        LayerNorm that follows it in one pass (llmkernels.add_layer_norm; the fused model's)."""
        # Under autocast the branch arrives in bf16 and the stream stays float32; the fused
        # op takes one dtype, the one `+` would promote to.
        dtype = torch.promote_types(branch.dtype, stream.dtype)
        return _llmkernels().add_layer_norm(branch.to(dtype), stream.to(dtype), self.weight, self.bias, self.eps)


class KVCache:
    """Keys and values of the tokens seen so far, one slot per layer, for decoding.

    Preallocated to the context length; `length` counts the cached positions. The
    model writes each layer's new keys/values at [length, length + T) and advances
    `length` once all layers have run.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (batch_size, config.n_head, config.context_length, config.head_dim)  # (B, H, ctx, D)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) after the cached ones; return all keys and values (B, H, S, D)."""
        end = self.length + k.shape[2]  # S = length + T
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions of the next num_tokens tokens, (T,): they follow the cached ones."""
        return torch.arange(self.length, self.length + num_tokens, device=self.keys[0].device)

    def attention_mask(self, num_tokens: int) -> torch.Tensor | None:
        """None: every row has the same length, so attention uses its ordinary causal mask.
        A cache whose rows hold different lengths (llm.serving's RowKVCache) returns a
        (B, 1, T, S) mask instead."""
        return None

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each token sees itself and the tokens before it."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_index = layer_index  # which KVCache slot is ours
        self.use_fused = config.use_fused
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # scaled init, see GPT._init_weights
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, H, T, D) -> (B, H, S, D)
            mask = kv_cache.attention_mask(T)  # (B, 1, T, S) when rows differ in length

        if mask is not None:  # rows of different lengths: a per-row mask, which the fused kernels do not take
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        elif self.use_fused:
            # Causal mask aligned bottom-right: query i (of T) sees keys j <= i + S - T.
            # On a GPU the CUDA kernel takes S == T (training) where it fits and the Triton
            # kernel the rest, decoding included (T=1 against the cache); on CPU, llmkernels'
            # reference (or Triton's interpreter under TRITON_INTERPRET=1).
            y = _llmkernels().flash_attention(q, k, v, causal=True)  # (B, H, T, D)
        else:
            y = self._attention(q, k, v)  # (B, H, T, D)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + causal mask) v, with PyTorch's fused SDPA."""
        T, S = q.shape[2], k.shape[2]
        dropout = self.attn_dropout if self.training else 0.0
        if T == S:  # no cache: the ordinary lower-triangular mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        # With a cache the T new queries sit at the end: query i sees keys j <= i + S - T.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # (T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, tanh GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.use_fused = config.use_fused
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused and type(self.c_fc) is nn.Linear:
            h = F.linear(x, self.c_fc.weight)  # (B, T, C) -> (B, T, 4C), bias added in the fused op
            # gelu_tanh(h + bias), (B, T, 4C); under autocast h is bf16 while the bias stays
            # float32, and the fused kernels take one dtype (the cast is differentiable).
            h = _llmkernels().bias_gelu(h, self.c_fc.bias.to(h.dtype))
        elif self.use_fused:  # c_fc wrapped (a LoRA adapter, llm.finetune.lora): its own forward
            h = _llmkernels().gelu(self.c_fc(x))  # (B, T, C) -> (B, T, 4C)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, C) -> (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, config.use_fused)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, config.use_fused)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x

    def forward_fused(
        self, x: torch.Tensor, x_normed: torch.Tensor, next_norm: LayerNorm, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same block on (stream, normed) pairs, each residual add fused with the
        LayerNorm after it: x (B, T, C) is the residual stream entering the block and
        x_normed = ln_1(x); returns the stream leaving it and next_norm of that stream
        (the next block's ln_1, or ln_f after the last block), both (B, T, C)."""
        x, h = self.ln_2.add_and_norm(self.attn(x_normed, kv_cache), x)  # x + attn(ln_1(x)), ln_2 of it
        return next_norm.add_and_norm(self.mlp(h), x)  # x + mlp(ln_2(x)), next_norm of it


def training_flops_per_token(parameters: int, position_embeddings: int, n_layer: int, seq: int, n_embd: int) -> float:
    """Training FLOPs per token of a GPT attending over `seq` tokens (the PaLM estimate): 6 per
    weight (forward 2, backward 4; position lookups cost none) plus attention scores and
    weighted sum, 6 * 2 * n_layer * seq * n_embd. Any GPT-2-shaped model (benchmarks/e2e.py
    counts Hugging Face's GPT-2 with it too)."""
    return 6 * (parameters - position_embeddings) + 12 * n_layer * seq * n_embd


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, final LayerNorm, tied LM head.

    Module names follow Hugging Face's GPT2LMHeadModel, so weights map one to one
    (see llm.weights).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.context_length, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=LayerNorm(config.n_embd, config.layer_norm_eps, config.use_fused),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one (Vp, C) matrix, counted once
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases; the projections that write into
        # the residual stream get std 0.02 / sqrt(2 * n_layer), because each of the
        # 2 * n_layer residual branches adds its variance to the stream.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the tied LM head counted once (parameters() deduplicates)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token over the whole context (training_flops_per_token)."""
        cfg = self.config
        return training_flops_per_token(self.num_parameters(), self.transformer.wpe.weight.numel(), cfg.n_layer,
                                        cfg.context_length, cfg.n_embd)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final LayerNorm's output (B, T, C): what the LM head reads, and
        what a classification head reads instead (llm.finetune.classify)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens ({start} cached + {T} new) is longer than "
                f"the model's context_length {self.config.context_length}"
            )
        pos = kv_cache.positions(T) if kv_cache is not None else torch.arange(T, device=idx.device)  # (T,) or (B, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T or B x T, C) -> (B, T, C)
        x = self.transformer.drop(x)
        x = self._blocks_and_final_norm(x, kv_cache)  # (B, T, C): ln_f of the stream after the blocks
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss). With a KVCache, idx holds only the new
        tokens; they are placed after the cached ones.

        Without targets: logits (B, T, vocab_size), loss None (generation).
        With targets (B, T): loss is the mean cross-entropy (targets == -1 are ignored), and
        logits are (B, T, vocab_size), except with config.use_fused, where the loss comes
        from llmkernels.linear_cross_entropy, which never forms the (B*T, V) logits, and
        logits is None (training and evaluation need only the loss)."""
        B, T = idx.shape
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if targets is not None and self.config.use_fused:
            loss = _llmkernels().linear_cross_entropy(
                x.reshape(B * T, -1),  # (B, T, C) -> (B*T, C)
                self.lm_head.weight[: self.config.vocab_size],  # (V, C): the tied weight without its padding rows
                targets.reshape(B * T),  # (B, T) -> (B*T,)
                ignore_index=-1,
            )
            return None, loss
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, Vp)
        logits = logits[..., : self.config.vocab_size]  # drop padding rows: (B, T, Vp) -> (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(B * T, -1).float(),  # (B, T, V) -> (B*T, V)
                targets.reshape(B * T),  # (B, T) -> (B*T,)
                ignore_index=-1,
            )
        return logits, loss

    def _blocks_and_final_norm(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """The residual stream x (B, T, C) through every block, then ln_f: (B, T, C)."""
        blocks = self.transformer.h
        if not self.config.use_fused:
            for block in blocks:
                x = block(x, kv_cache)  # (B, T, C)
            return self.transformer.ln_f(x)
        # Fused: every residual add shares one pass with the LayerNorm after it, so the
        # blocks hand on (stream, normed) pairs. Only the first LayerNorm has no add before
        # it; the last block's second add goes with ln_f.
        normed = blocks[0].ln_1(x)  # (B, T, C)
        next_norms = [block.ln_1 for block in blocks[1:]] + [self.transformer.ln_f]
        for block, next_norm in zip(blocks, next_norms):
            x, normed = block.forward_fused(x, normed, next_norm, kv_cache)  # (B, T, C) each
        return normed

    def new_kv_cache(self, batch_size: int) -> KVCache:
        weight = self.transformer.wte.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

    def crop_context(self, context_length: int) -> None:
        """Shrink the context (e.g. fine-tune GPT-2 on 256 tokens instead of 1024)."""
        if not 0 < context_length <= self.config.context_length:
            raise ValueError(
                f"context_length must be in [1, {self.config.context_length}], got {context_length}"
            )
        self.config.context_length = context_length
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:context_length].detach().clone())
