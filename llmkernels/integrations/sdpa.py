"""llmkernels as a flash-attention provider for F.scaled_dot_product_attention (SDPA).

PyTorch >= 2.10 lets a package register a flash-attention implementation under a name
(torch.nn.attention.register_flash_attention_impl); activating it replaces the CUDA
kernels of SDPA's flash path in the dispatcher, the way PyTorch plugs in FlashAttention-4
(torch/nn/attention/_fa4.py). `import llmkernels` registers the name "llmkernels";
nothing changes until it is activated:

    torch.nn.attention.activate_flash_attention_impl("llmkernels")   # or llmkernels.activate_sdpa()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # flash path -> llmkernels
    torch.nn.attention.restore_flash_attention_impl()                # or llmkernels.deactivate_sdpa()

What is replaced: the CUDA kernels of the two aten ops of SDPA's flash path,

    aten::_scaled_dot_product_flash_attention           q, k, v (B, H, S, D) -> (out, logsumexp, ...)
    aten::_scaled_dot_product_flash_attention_backward  grad_out, q, k, v, out, logsumexp, ... -> (dq, dk, dv)

with the implementations below, which keep the aten schemas (argument names, defaults,
the full return tuples), so SDPA's autograd formula, torch.compile and every other caller
of these ops work unchanged. Each call goes to llmkernels.flash_attention's backends as
`backend="auto"` picks them (CUDA kernel, Triton kernel, else the plain-PyTorch reference;
llmkernels.explain("flash_attention", q, k, v, causal, scale) says which and why), so a call
the fused kernels cannot take (a head dim, GQA or a KV-cache shape they lack) runs the
reference instead of failing. Dropout (which no fused kernel implements) runs the
reference too, with its mask regenerated from a seed in the backward.

The flash path's is_causal aligns the mask to the bottom-right when Sq < Sk (query i sees
keys j <= i + Sk - Sq), as llmkernels' causal mask does. SDPA picks the flash path only on
CUDA (fp16/bf16, no attn_mask); on CPU it keeps PyTorch's own kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.library import Library

from .. import backends
from ..attention import attention_scores, flash_attention_reference

PROVIDER_NAME = "llmkernels"
FORWARD_OP = "_scaled_dot_product_flash_attention"
BACKWARD_OP = "_scaled_dot_product_flash_attention_backward"
DISPATCH_KEY = "CUDA"


def registry_available() -> bool:
    """Whether this torch has the flash-attention provider registry (torch >= 2.10)."""
    return hasattr(torch.nn.attention, "activate_flash_attention_impl")


# ----------------------------------------------------------------------------- helpers
def _default_scale(query: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def _chosen_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> str:
    """The backend llmkernels.flash_attention(backend="auto") runs these inputs on."""
    return backends.select_backend("flash_attention", "auto", query, key, value, scale)


def _dropout_keep_mask(seed: int, shape: torch.Size, dropout_p: float, device: torch.device) -> torch.Tensor:
    """Which attention probabilities dropout keeps; the same mask for the same seed, so the
    backward regenerates the forward's mask from the seed it saved in rng_state."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _reference_forward(query, key, value, dropout_p: float, is_causal: bool, scale: float, seed: int):
    """The reference attention; with dropout_p > 0 the probabilities outside the mask of `seed`
    are dropped and the kept ones scaled by 1 / (1 - p). In at least float32."""
    if dropout_p == 0.0:
        return flash_attention_reference(query, key, value, is_causal, scale)
    scores = attention_scores(query, key, is_causal, scale)  # (B, H, Sq, Sk)
    keep = _dropout_keep_mask(seed, scores.shape, dropout_p, query.device)
    probs = torch.softmax(scores, dim=-1) * keep / (1.0 - dropout_p)
    value = value.to(probs.dtype).repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # (B, H, Sk, D)
    return (probs @ value).to(query.dtype)  # (B, H, Sq, D)


# ------------------------------------------------------------- the two aten kernels
def scaled_dot_product_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    return_debug_mask: bool = False,
    *,
    scale: Optional[float] = None,
):
    """aten::_scaled_dot_product_flash_attention: q (B, H, Sq, D), k, v (B, Hkv, Sk, D) ->
    (output (B, H, Sq, D), logsumexp (B, H, Sq) float32 natural log, cum_seq_q None,
    cum_seq_k None, max_q Sq, max_k Sk, rng_state (2,) uint64, unused () uint64,
    debug_attn_mask empty)."""
    if return_debug_mask:
        raise NotImplementedError(f"{PROVIDER_NAME} flash attention: return_debug_mask=True is not supported "
                                  "(the debug mask is a test aid of PyTorch's own kernel)")
    scale = _default_scale(query, scale)
    seed = 0
    chosen = "reference" if dropout_p > 0.0 else _chosen_backend(query, key, value, scale)
    if chosen != "reference":
        output, logsumexp = backends.fused_op(chosen, "flash_attention_forward")(query, key, value, is_causal, scale)
    else:
        if dropout_p > 0.0:  # no fused kernel has dropout: the reference, with a seed the backward replays
            seed = int(torch.randint(2**62, (), dtype=torch.int64))
        output = _reference_forward(query, key, value, dropout_p, is_causal, scale, seed)
        logsumexp = torch.logsumexp(attention_scores(query, key, is_causal, scale), dim=-1).float()  # (B, H, Sq)
    # The seed where PyTorch's kernel keeps its Philox (seed, offset); dtypes and shapes as its meta
    # function. Without dropout no host value is copied to the device.
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)
    if seed:
        rng_state = torch.tensor([seed, 0], dtype=torch.uint64, device=query.device)
    unused = torch.zeros((), dtype=torch.uint64, device=query.device)
    debug_attn_mask = query.new_empty(0)
    return (output, logsumexp, None, None, query.shape[2], key.shape[2], rng_state, unused, debug_attn_mask)


def scaled_dot_product_flash_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    cum_seq_q: Optional[torch.Tensor],
    cum_seq_k: Optional[torch.Tensor],
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    philox_seed: torch.Tensor,
    philox_offset: torch.Tensor,
    *,
    scale: Optional[float] = None,
):
    """aten::_scaled_dot_product_flash_attention_backward -> (grad_query, grad_key, grad_value),
    shaped like query, key, value. philox_seed is the forward's rng_state."""
    scale = _default_scale(query, scale)
    chosen = "reference" if dropout_p > 0.0 else _chosen_backend(query, key, value, scale)
    if chosen != "reference":
        return backends.fused_op(chosen, "flash_attention_backward")(
            grad_out, query, key, value, out, logsumexp, is_causal, scale
        )
    # The reference backward: autograd through the reference forward, recomputed.
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (query, key, value)]
        seed = int(philox_seed[0].item()) if dropout_p > 0.0 else 0
        output = _reference_forward(*inputs, dropout_p, is_causal, scale, seed)
        return tuple(torch.autograd.grad(output, inputs, grad_out))


IMPLEMENTATIONS = {
    FORWARD_OP: scaled_dot_product_flash_attention,
    BACKWARD_OP: scaled_dot_product_flash_attention_backward,
}


# ----------------------------------------------------------------- registration
class _Activation:
    """What activation installed: the aten IMPL library. remove() takes the kernels out of
    the dispatcher again (torch's restore_flash_attention_impl calls it)."""

    def __init__(self, library: Library):
        self.library: Optional[Library] = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def install() -> _Activation:
    """Registers the kernels for SDPA's flash ops on CUDA; torch's activate_flash_attention_impl
    calls this (the register_fn of the name "llmkernels")."""
    library = Library("aten", "IMPL", DISPATCH_KEY)
    for op, implementation in IMPLEMENTATIONS.items():
        library.impl(op, implementation, DISPATCH_KEY)
    return _Activation(library)


def _require_registry() -> None:
    if not registry_available():
        raise RuntimeError(f"SDPA flash-attention providers need torch >= 2.10 "
                           f"(torch.nn.attention.activate_flash_attention_impl); this is torch {torch.__version__}")


def activate() -> None:
    """Routes SDPA's flash path through llmkernels (replacing any other active provider)."""
    _require_registry()
    torch.nn.attention.activate_flash_attention_impl(PROVIDER_NAME)


def deactivate() -> None:
    """Restores PyTorch's own flash kernels if llmkernels is the active provider."""
    _require_registry()
    if torch.nn.attention.current_flash_attention_impl() == PROVIDER_NAME:
        torch.nn.attention.restore_flash_attention_impl()
