"""llmkernels: fused attention, LayerNorm (alone or after a residual add), GELU and
linear + cross-entropy kernels (CUDA and Triton) for training GPTs, each behind one
function with a plain-PyTorch reference it falls back to.

    import llmkernels
    out = llmkernels.flash_attention(q, k, v, causal=True)       # (B, H, S, D)
    y = llmkernels.layer_norm(x, weight, bias, eps=1e-5)
    stream, y = llmkernels.add_layer_norm(x, residual, weight, bias)  # (x + residual, its LayerNorm)
    y = llmkernels.gelu(x)                                       # tanh approximation
    y = llmkernels.bias_gelu(x, bias)
    loss = llmkernels.linear_cross_entropy(x, weight, targets)   # LM head + cross-entropy, no (N, V) logits
    llmkernels.available_backends()   # which of cuda / triton / reference run here, and why not
"""
from .add_layer_norm import add_layer_norm, add_layer_norm_reference
from .attention import flash_attention, flash_attention_reference
from .backends import BACKENDS, BackendUnavailableError, available_backends, explain
from .gelu import bias_gelu, bias_gelu_reference, gelu, gelu_reference
from .layer_norm import layer_norm, layer_norm_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "add_layer_norm",
    "add_layer_norm_reference",
    "available_backends",
    "bias_gelu",
    "bias_gelu_reference",
    "explain",
    "flash_attention",
    "flash_attention_reference",
    "gelu",
    "gelu_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]
