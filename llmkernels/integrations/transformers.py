"""llmkernels in Hugging Face `transformers` models.

Importing this module registers an attention implementation named "llmkernels" (and the
mask it wants) with transformers, for every model built on its attention interface
(GPT-2, Llama, Qwen2, Mistral, ...):

    import llmkernels.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="llmkernels")
    model.set_attn_implementation("llmkernels")          # or switch a loaded model

and apply_llmkernels_to_gpt2 patches GPT-2 the way Liger-Kernel's apply_liger_kernel_to_*
patch their models: attention, every LayerNorm, the MLP's bias + tanh-GELU, and the
training loss through llmkernels.linear_cross_entropy, which never forms the (B*T, V) logits.

    apply_llmkernels_to_gpt2(model)   # this GPT2LMHeadModel, and every GPT-2 model built after

What runs where:
  attention  llmkernels.flash_attention (fused kernel, else its reference) when transformers
             passes no mask (a causal or full pattern: no padding) and no dropout; GQA (Hkv
             dividing H) and decode steps (Sq = 1 < Sk) included. A padding mask, attention
             dropout (GPT-2's attn_pdrop in training), a position bias or a softcap go to
             transformers' own SDPA attention, which takes them.
  loss       in training (model.train()) with labels: linear_cross_entropy on the last hidden
             states, logits None. In eval, or without labels (generate), the stock forward.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, GPT2LMHeadModel, GPT2PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D
from transformers.utils import can_return_tuple

import llmkernels

ATTENTION_NAME = "llmkernels"
# GPT-2 activations that are the tanh approximation of GELU, the one the fused kernels compute.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
IGNORE_INDEX = -100  # transformers' label for "no loss here"


# ------------------------------------------------------------------------ attention
def llmkernels_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, Sq, D), key, value (B, Hkv, Sk, D) ->
    (output (B, Sq, H, D), no attention weights). Same semantics as transformers' "sdpa"."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    query_len, key_len = query.shape[2], key.shape[2]
    # With no mask, transformers means sdpa's is_causal, whose mask is aligned top-left;
    # the fused kernels align bottom-right. The two agree when Sq == Sk, and for Sq == 1
    # transformers asks for no causal mask at all (the new token sees the whole cache).
    causal = bool(is_causal) and query_len > 1
    takes_call = (attention_mask is None and dropout == 0.0 and (not causal or query_len == key_len)
                  and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)
    if not takes_call:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = llmkernels.flash_attention(query, key, value, causal=causal, scale=scaling)  # (B, H, Sq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, H, D)


AttentionInterface.register(ATTENTION_NAME, llmkernels_attention_forward)
# The mask transformers builds for "sdpa": None for a plain causal/full pattern (what the
# fused path takes), a boolean (B, 1, Sq, Sk) mask with padding.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# ----------------------------------------------------------- GPT-2 module forwards
def _layer_norm_forward(self: nn.LayerNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    return llmkernels.layer_norm(hidden_states, self.weight, self.bias, self.eps)


def _gpt2_mlp_forward(self: GPT2MLP, hidden_states: torch.Tensor) -> torch.Tensor:
    """GPT2MLP.forward with c_fc's bias add and the tanh GELU in one kernel (bias_gelu)."""
    if type(self.c_fc) is Conv1D:
        h = hidden_states @ self.c_fc.weight  # (B, T, C) @ (C, 4C) -> (B, T, 4C); Conv1D's weight is (in, out)
        h = llmkernels.bias_gelu(h, self.c_fc.bias.to(h.dtype))  # gelu_tanh(h + bias), (B, T, 4C)
    else:  # c_fc wrapped (a peft LoRA layer): its own forward, then the GELU
        h = llmkernels.gelu(self.c_fc(hidden_states))  # (B, T, C) -> (B, T, 4C)
    return self.dropout(self.c_proj(h))  # (B, T, 4C) -> (B, T, C)


@can_return_tuple
def _gpt2_lm_forward(self: GPT2LMHeadModel, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
    """GPT2LMHeadModel.forward whose training loss comes from llmkernels.linear_cross_entropy
    on the hidden states (logits None); everything else is the stock forward."""
    fused = self.training and labels is not None and logits_to_keep == 0 and type(self.lm_head) is nn.Linear
    if not fused:
        return type(self).forward(self, input_ids, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # the Trainer's token count across accumulation
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.transformer(input_ids, **kwargs)
    hidden_states = outputs.last_hidden_state  # (B, T, C)
    if shift_labels is None:  # token t predicts label t + 1, as transformers' ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T)
    loss = llmkernels.linear_cross_entropy(
        hidden_states.reshape(-1, hidden_states.shape[-1]),  # (B, T, C) -> (B*T, C)
        self.lm_head.weight,  # (V, C)
        shift_labels.reshape(-1).to(hidden_states.device),  # (B*T,)
        bias=self.lm_head.bias,
        ignore_index=IGNORE_INDEX,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    extras = {name: value for name, value in outputs.items() if name != "last_hidden_state"}
    return CausalLMOutputWithCrossAttentions(loss=loss, logits=None, **extras)


def _bind(module: nn.Module, name: str, function) -> None:
    """module.<name> = function bound to module, for this instance only (Liger's pattern)."""
    setattr(module, name, MethodType(function, module))


# --------------------------------------------------------------------- patching
# What apply_llmkernels_to_gpt2 asked for, applied to every GPT-2 model built afterwards.
_CLASS_PATCH: dict[str, bool] = {}
_STOCK_POST_INIT = GPT2PreTrainedModel.post_init


def _patch_gpt2(model: GPT2PreTrainedModel, attention: bool, layer_norm: bool, gelu: bool,
                fused_linear_cross_entropy: bool) -> None:
    tanh_gelu = model.config.activation_function in TANH_GELUS
    for module in model.modules():
        if layer_norm and isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            _bind(module, "forward", _layer_norm_forward)
        if gelu and tanh_gelu and isinstance(module, GPT2MLP):
            _bind(module, "forward", _gpt2_mlp_forward)
    if fused_linear_cross_entropy and isinstance(model, GPT2LMHeadModel):
        _bind(model, "forward", _gpt2_lm_forward)
    if attention:
        model.set_attn_implementation(ATTENTION_NAME)


def _post_init_and_patch(self: GPT2PreTrainedModel) -> None:
    _STOCK_POST_INIT(self)
    _patch_gpt2(self, **_CLASS_PATCH)


def apply_llmkernels_to_gpt2(
    model: nn.Module | None = None,
    attention: bool = True,
    layer_norm: bool = True,
    gelu: bool = True,
    fused_linear_cross_entropy: bool = True,
) -> None:
    """Patch Hugging Face GPT-2 to run on llmkernels: `model` (a GPT-2 model such as
    GPT2LMHeadModel, or a peft model around one) now, and every GPT-2 model built after
    this call (GPT2LMHeadModel(config), from_pretrained) as it is built, until
    revert_llmkernels_gpt2_class_patch().

    attention                   attn_implementation="llmkernels" (see llmkernels_attention_forward)
    layer_norm                  every LayerNorm -> llmkernels.layer_norm
    gelu                        the MLP's c_fc bias + tanh GELU -> llmkernels.bias_gelu
                                (only for activation_function "gelu_new"/"gelu_pytorch_tanh")
    fused_linear_cross_entropy  training loss -> llmkernels.linear_cross_entropy, no logits
    """
    flags = {"attention": attention, "layer_norm": layer_norm, "gelu": gelu,
             "fused_linear_cross_entropy": fused_linear_cross_entropy}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
        if not isinstance(base, GPT2PreTrainedModel):
            raise TypeError(f"model must be a transformers GPT-2 model (e.g. GPT2LMHeadModel), "
                            f"got {type(model).__name__}")
        _patch_gpt2(base, **flags)
    _CLASS_PATCH.update(flags)
    GPT2PreTrainedModel.post_init = _post_init_and_patch


def revert_llmkernels_gpt2_class_patch() -> None:
    """GPT-2 models built from now on are stock again; models already patched stay patched
    (build a fresh one, or reload it, to get a stock model back)."""
    _CLASS_PATCH.clear()
    GPT2PreTrainedModel.post_init = _STOCK_POST_INIT
