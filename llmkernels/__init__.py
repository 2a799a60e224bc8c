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
    llmkernels.activate_sdpa()        # F.scaled_dot_product_attention's flash path (CUDA) -> these kernels

Hugging Face models: llmkernels.integrations.transformers (attn_implementation="llmkernels",
apply_llmkernels_to_gpt2).
"""
import importlib

import torch

from .add_layer_norm import add_layer_norm, add_layer_norm_reference
from .attention import flash_attention, flash_attention_reference
from .backends import BACKENDS, BackendUnavailableError, available_backends, explain
from .gelu import bias_gelu, bias_gelu_reference, gelu, gelu_reference
from .layer_norm import layer_norm, layer_norm_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def activate_sdpa() -> None:
    """Route F.scaled_dot_product_attention's flash path (CUDA, forward and backward) through
    these kernels, as torch.nn.attention.activate_flash_attention_impl("llmkernels") does;
    calls the fused kernels cannot take run the reference (llmkernels/integrations/sdpa.py)."""
    importlib.import_module(".integrations.sdpa", __name__).activate()


def deactivate_sdpa() -> None:
    """Give SDPA's flash path back to PyTorch's own kernels."""
    importlib.import_module(".integrations.sdpa", __name__).deactivate()


# The provider's name goes into torch's registry now (torch >= 2.10); its kernels are
# imported and installed only when someone activates it, never on import.
if hasattr(torch.nn.attention, "register_flash_attention_impl"):
    torch.nn.attention.register_flash_attention_impl(
        "llmkernels", register_fn=lambda: importlib.import_module(".integrations.sdpa", __name__).install()
    )

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "activate_sdpa",
    "add_layer_norm",
    "add_layer_norm_reference",
    "available_backends",
    "bias_gelu",
    "bias_gelu_reference",
    "deactivate_sdpa",
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
