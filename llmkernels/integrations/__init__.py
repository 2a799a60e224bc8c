"""The kernels in other people's models. Each module is imported on its own and only when
asked for, so `import llmkernels` needs neither transformers nor anything else:

  sdpa          llmkernels as PyTorch's SDPA flash-attention provider (llmkernels.activate_sdpa())
  transformers  attn_implementation="llmkernels" and apply_llmkernels_to_gpt2 for Hugging Face models
"""
