"""Causal (or full) scaled dot-product attention on (batch, heads, seq, head_dim):

    out = softmax(q @ k^T * scale + causal_mask) @ v      q: (B, H, Sq, D), k, v: (B, Hkv, Sk, D)

Grouped-query attention: H a multiple of Hkv, query head h uses key/value head
h // (H // Hkv). With fewer queries than keys (prefill or decoding after a KV cache) the
causal mask is aligned bottom-right (see causal_mask). What each backend takes:
  cuda       float16/bfloat16, head_dim 64 or 128, any Hkv dividing H, Sq == Sk
  triton     float16/bfloat16/float32, head_dim 16-128, any Hkv dividing H, any Sq, Sk
  reference  everything valid

The fused kernels (csrc/flash_attention.cu, llmkernels/triton/attention.py) never form
the (seq x seq) score matrix: they stream key/value tiles with an online softmax and
save one log-sum-exp per query row (lse) so the backward pass can recompute the scores.
This file holds the plain-PyTorch reference, the fake and autograd registrations of the
fused ops and the public function.
"""
import math
from typing import Optional

import torch

from . import backends
from .validation import check_bool, check_finite_number, check_same_device, check_same_dtype, check_tensor

CUDA_HEAD_DIMS = (64, 128)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_GRID_DIM = 65535  # batch and heads are grid dimensions y and z
# The largest shared-memory tile of the forward/backward kernels per head dim
# (csrc/flash_attention.cu, TILES): D=128 fits A100/H100 but not the 99 KB of sm_86/sm_89.
CUDA_SHARED_MEMORY_BYTES = {64: 56_320, 128: 104_448}

if backends.TRITON_IMPORTABLE:
    from .triton import attention as triton_attention


# ----------------------------------------------------------------------------- reference
def causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """(query_len, key_len) bool, True where query i may attend to key j.

    Aligned bottom-right: query i sees keys j <= i + (key_len - query_len), so with a KV
    cache the newest query sees every cached key, and query_len == key_len is the
    ordinary lower-triangular mask."""
    visible = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    return visible.tril(diagonal=key_len - query_len)


def attention_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """scale * q @ k^T in at least fp32, the causal mask's hidden entries -inf: (B, H, Sq, Sk).
    k (B, Hkv, Sk, D) is repeated for the H // Hkv query heads of each group."""
    heads, kv_heads = q.shape[1], k.shape[1]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    q_, k_ = q.to(compute_dtype), k.to(compute_dtype)
    if kv_heads != heads:
        k_ = k_.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, Sk, D)
    scores = (q_ @ k_.transpose(-2, -1)) * scale  # (B, H, Sq, D) @ (B, H, D, Sk) -> (B, H, Sq, Sk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return scores


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: Optional[float] = None
) -> torch.Tensor:
    """Attention written out in plain PyTorch (materialises the scores), in at least fp32.

    q: (B, H, Sq, D); k, v: (B, Hkv, Sk, D) with H a multiple of Hkv (grouped-query
    attention: each group of H // Hkv query heads shares one key/value head)."""
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = attention_scores(q, k, causal, scale)  # (B, H, Sq, Sk)
    probs = torch.softmax(scores, dim=-1)  # (B, H, Sq, Sk), each row sums to 1
    v_ = v.to(scores.dtype)
    if kv_heads != heads:
        v_ = v_.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, Sk, D)
    out = probs @ v_  # (B, H, Sq, Sk) @ (B, H, Sk, D) -> (B, H, Sq, D)
    return out.to(q.dtype)


# ------------------------------------------------------- fused ops: fake + autograd
def _register_fake_cuda_ops() -> None:
    @torch.library.register_fake("llmkernels::flash_attention_forward")
    def _(q, k, v, causal, scale):
        batch, heads, seq, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((batch, heads, seq), dtype=torch.float32)

    @torch.library.register_fake("llmkernels::flash_attention_backward")
    def _(grad_out, q, k, v, out, lse, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _register_autograd(backend: str) -> None:
    forward_name = "llmkernels::" + backends.FUSED_OP_PREFIX[backend] + "flash_attention_forward"
    attention_backward = backends.fused_op(backend, "flash_attention_backward")

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return grad_q, grad_k, grad_v, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


if backends.CUDA_EXTENSION_LOADED:
    _register_fake_cuda_ops()
for _backend in backends.registered_fused_backends():
    _register_autograd(_backend)


# ------------------------------------------------------------------------- dispatch
def _flash_attention_unsupported(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "triton":
        return triton_attention.supports_flash_attention(q, k, v, scale)
    if q.shape[2] != k.shape[2]:
        return (f"query length {q.shape[2]} differs from key length {k.shape[2]} (a KV cache); "
                "the CUDA kernels need equal lengths")
    if q.device.type != "cuda":
        return f"q is on {q.device}, the CUDA kernels need CUDA tensors"
    if q.dtype not in CUDA_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16)"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not supported {CUDA_HEAD_DIMS}"
    if max(q.shape[0], q.shape[1]) > CUDA_MAX_GRID_DIM:
        return f"batch {q.shape[0]} and heads {q.shape[1]} must each be <= {CUDA_MAX_GRID_DIM} (grid dimensions)"
    shared_memory = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    if shared_memory < CUDA_SHARED_MEMORY_BYTES[q.shape[-1]]:
        return (f"head_dim {q.shape[-1]} needs {CUDA_SHARED_MEMORY_BYTES[q.shape[-1]]} bytes of shared memory per "
                f"block, this GPU offers {shared_memory}")
    return None


def _check_attention_arguments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: Optional[float] = None
) -> tuple:
    """flash_attention's input checks; returns (q, k, v, scale) with the default scale filled in."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q)
        check_same_device(name, t, "q", q)
    check_bool("causal", causal)
    batch, heads, query_len, head_dim = q.shape
    # k is checked against q first, then v against k, so each error blames the tensor that is off.
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape (batch={batch}, kv_heads, key_len, head_dim={head_dim}) like q, got {tuple(k.shape)}"
        )
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"the heads of q ({heads}) must be a multiple of the heads of k ({k.shape[1]})")
    if v.shape != k.shape:
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    if causal and query_len > k.shape[2]:
        raise ValueError(f"causal attention needs query length ({query_len}) <= key length ({k.shape[2]})")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k must not be empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if scale is None:
        return q, k, v, 1.0 / math.sqrt(head_dim)
    check_finite_number("scale", scale)
    return q, k, v, float(scale)


backends.register_op("flash_attention", _check_attention_arguments, _flash_attention_unsupported)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D) -> (B, H, Sq, D).

    scale defaults to 1/sqrt(D); the causal mask is aligned bottom-right (see causal_mask)."""
    q, k, v, scale = _check_attention_arguments(q, k, v, causal, scale)
    chosen = backends.select_backend("flash_attention", backend, q, k, v, scale)
    if chosen == "reference":
        return flash_attention_reference(q, k, v, causal, scale)
    out, _lse = backends.fused_op(chosen, "flash_attention_forward")(q, k, v, causal, scale)
    return out
