"""End to end: GPT-2 124M training steps with llm's model, use_fused off and on, eager and
torch.compile (B16 x T1024, bf16 autocast, fused AdamW, random tokens).

tokens/s = tokens per step / mean step time (as the anchors measure it); MFU counts the
model's training FLOPs per token (6N + 12*L*T*C, T the run's sequence length) against the
stated dense bf16 peak of the H100/H200 SXM, 989 TFLOP/s (the anchors' figure), and
against the bf16 matmul ceiling measured in the same run. Peak memory is counted from the
first timed step (compilation and autotuning excluded). The use_fused rows run llmkernels'
"auto" choice per op (LLMKERNELS_BACKEND is unset for them: on a GPU the CUDA kernels, and
Triton for linear_cross_entropy, which has no CUDA kernel) and name the fused backends usable
there. On CPU a tiny model (preset "tiny" with a 512-token vocabulary, B2 x T64, fp32)
shows the path works; no MFU there.

The same table has Hugging Face GPT-2 rows (eager only, to keep the headline run in its time):
transformers.GPT2LMHeadModel as it comes (attn_implementation="sdpa") and patched with
llmkernels.integrations.transformers.apply_llmkernels_to_gpt2, built by benchmarks/hf.py's
stock_model and build_model at the llm rows' sizes, trained with the same optimizer, precision
and timing. They are skipped, with the reason, where transformers is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time

import torch

from .kernels import recording_error

SXM_PEAK_TFLOPS = 989.0  # H100 and H200 SXM, dense bf16
CONFIGS = [("eager", False), ("eager", True), ("compile", False), ("compile", True)]
# Hugging Face GPT-2 rows (benchmarks/hf.py's variants): stock, then patched (use_fused).
HF_VARIANTS = [("stock", False), ("llmkernels", True)]
# Expected wall seconds of a GPU row before any has been timed in the run (model build, warm-up
# steps with compilation or autotuning, timed steps).
ESTIMATE_S = {("llm", "eager"): 10, ("llm", "compile"): 60, ("transformers", "eager"): 30}


def fused_backend() -> str | None:
    """What use_fused rows run: "auto", with the fused backends it can pick from here."""
    try:
        import llmkernels
    except Exception:
        return None
    usable = [name for name, (ok, _) in llmkernels.available_backends().items() if ok and name != "reference"]
    return f"auto: {', '.join(usable) or 'reference only'}"


def plan(device: str, quick: bool, use_compile: bool) -> list[dict]:
    """The configurations to run, each with its settings and an estimate of its wall time."""
    backend = fused_backend()
    if device == "cuda":
        batch, seq, preset, overrides = 16, 1024, "gpt2", {}
        warmup, steps = (3, 5) if quick else (5, 20)
    else:
        batch, seq, preset, overrides = 2, 64, "tiny", {"vocab_size": 512}
        warmup, steps = 1, 2
    shared = {"preset": preset, "overrides": overrides, "batch": batch, "seq": seq, "warmup_steps": warmup,
              "steps": steps}
    items = []
    for mode, fused in CONFIGS:
        item = {"model": "llm", "mode": mode, "use_fused": fused, "backend": backend if fused else None, **shared,
                "estimate_s": ESTIMATE_S["llm", mode]}
        if mode == "compile" and not use_compile:
            item["skipped"] = "torch.compile off for this run (--compile)"
        items.append(item)
    no_transformers = importlib.util.find_spec("transformers") is None
    for variant, fused in HF_VARIANTS:
        item = {"model": "transformers", "variant": variant, "mode": "eager", "use_fused": fused,
                "backend": backend if fused else None, **shared, "estimate_s": ESTIMATE_S["transformers", "eager"]}
        if no_transformers:
            item["skipped"] = "transformers is not installed (pip install 'llmkernels[hf]')"
        items.append(item)
    return items


def label(item: dict) -> str:
    size = f"{item['preset']} B{item['batch']}xT{item['seq']} {item['mode']}"
    if item.get("model") == "transformers":
        patched = f"apply_llmkernels_to_gpt2 ({item['backend']})" if item["use_fused"] else "stock (sdpa)"
        return f"{size} transformers {patched}"
    fused = f"use_fused=True ({item['backend']})" if item["use_fused"] else "use_fused=False"
    return f"{size} {fused}"


@contextlib.contextmanager
def _auto_backend():
    """LLMKERNELS_BACKEND unset while a row runs: each op takes auto's choice."""
    from llmkernels.backends import BACKEND_ENV_VAR

    before = os.environ.pop(BACKEND_ENV_VAR, None)
    try:
        yield
    finally:
        if before is not None:
            os.environ[BACKEND_ENV_VAR] = before


def run(item: dict, device: str, matmul_ceiling_tflops: float | None = None) -> dict:
    """Trains `steps` steps after `warmup_steps` and returns the item with its figures
    (or with the error that stopped it)."""
    result = dict(item, label=label(item))
    if item.get("skipped"):
        return result
    with recording_error(result, device), _auto_backend():
        result.update(_train_steps(item, device, matmul_ceiling_tflops))
    return result


def _llm_model(item: dict, device: str):
    """llm's GPT for the row, and its loss of (inputs, targets), under torch.compile for a compile row."""
    from llm.config import GPTConfig
    from llm.model import GPT

    config = GPTConfig.from_preset(item["preset"], use_fused=item["use_fused"], **item["overrides"])
    model = GPT(config).to(device)
    step_model = torch.compile(model) if item["mode"] == "compile" else model

    def loss_of(inputs, targets):
        return step_model(inputs, targets)[1]

    return model, loss_of, config.to_dict()


def _transformers_model(item: dict, device: str):
    """transformers' GPT2LMHeadModel for the row (benchmarks/hf.py builds it: stock, or patched
    with apply_llmkernels_to_gpt2), and its loss of (inputs, labels)."""
    from .hf import build_model, stock_model

    model = build_model(item["variant"], stock_model(item["preset"], **item["overrides"]), device)

    def loss_of(inputs, labels):  # transformers shifts the labels itself: its loss covers T - 1 positions
        return model(inputs, labels=labels).loss

    # to_dict leaves out which attention runs: "sdpa" stock, "llmkernels" patched
    return model, loss_of, {**model.config.to_dict(), "attn_implementation": model.config._attn_implementation}


def _train_steps(item: dict, device: str, matmul_ceiling_tflops: float | None) -> dict:
    from llm.model import training_flops_per_token
    from llm.train import build_optimizer

    torch.manual_seed(0)
    build = _transformers_model if item.get("model") == "transformers" else _llm_model
    model, loss_of, config = build(item, device)
    # llm's own optimizer (fused AdamW on CUDA), with GPT-2's hyperparameters, for either model
    optimizer = build_optimizer(model, 6e-4, 0.1, (0.9, 0.95), device)
    batch, seq = item["batch"], item["seq"]
    vocab_size, n_layer, n_embd = config["vocab_size"], config["n_layer"], config["n_embd"]
    inputs = torch.randint(0, vocab_size, (batch, seq), device=device)  # random tokens: timing only
    targets = torch.randint(0, vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")  # CPU: fp32

    def step():
        with autocast:
            loss = loss_of(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(item["warmup_steps"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # from here: the training step's memory, not compilation's
    warmup_s = time.perf_counter() - start

    step_ms = []
    if device == "cuda":  # one event between steps: no sync, so launches still overlap
        events = [torch.cuda.Event(enable_timing=True) for _ in range(item["steps"] + 1)]
        events[0].record()
        for event in events[1:]:
            step()
            event.record()
        torch.cuda.synchronize()
        step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        for _ in range(item["steps"]):
            t0 = time.perf_counter()
            step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
    mean_ms = sum(step_ms) / len(step_ms)
    tokens_per_s = batch * seq / (mean_ms / 1e3)
    parameters = model.num_parameters()  # either model counts a tied LM head once
    position_embeddings = model.transformer.wpe.weight.numel()  # both models name them wpe
    figures = {
        "ms_per_step": mean_ms,
        "samples_ms": [round(t, 4) for t in step_ms],
        "tokens_per_s": tokens_per_s,
        "warmup_s": warmup_s,
        "parameters": parameters,
        "flops_per_token": training_flops_per_token(parameters, position_embeddings, n_layer, seq, n_embd),
        "optimizer": "llm.train.build_optimizer",
        "config": config,
        "mfu_peak_tflops": None,
        "mfu": None,
        "mfu_of_matmul_ceiling": None,
        "peak_memory_gib": None,
    }
    if device == "cuda":
        achieved_tflops = tokens_per_s * figures["flops_per_token"] / 1e12
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["mfu_peak_tflops"] = SXM_PEAK_TFLOPS
        figures["mfu"] = achieved_tflops / SXM_PEAK_TFLOPS
        if matmul_ceiling_tflops:
            figures["mfu_of_matmul_ceiling"] = achieved_tflops / matmul_ceiling_tflops
    return figures
