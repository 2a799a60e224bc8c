"""End to end: GPT-2 124M training steps with llm's model, use_fused off and on, eager and
torch.compile (B16 x T1024, bf16 autocast, fused AdamW, random tokens).

tokens/s = tokens per step / mean step time (as the anchors measure it); MFU counts the
model's training FLOPs per token (llm.model.GPT.flops_per_token: 6N + 12*L*T*C) against
a stated peak: 989 TFLOP/s, the H100 SXM dense bf16 figure the anchors use.
On CPU a tiny model (preset "tiny" with a 512-token vocabulary, B2 x T64, fp32) shows
the path works; no MFU there.
"""
from __future__ import annotations

import time

import torch

from .kernels import error_text

H100_PEAK_TFLOPS = 989.0
CONFIGS = [("eager", False), ("eager", True), ("compile", False), ("compile", True)]


def plan(device: str, quick: bool, use_compile: bool) -> list[dict]:
    """The configurations to run, each with its settings and an estimate of its wall time."""
    if device == "cuda":
        batch, seq, preset, overrides = 16, 1024, "gpt2", {}
        warmup, steps = (3, 5) if quick else (5, 20)
    else:
        batch, seq, preset, overrides = 2, 64, "tiny", {"vocab_size": 512}
        warmup, steps = 1, 2
    items = []
    for mode, fused in CONFIGS:
        item = {"mode": mode, "use_fused": fused, "preset": preset, "overrides": overrides, "batch": batch, "seq": seq,
                "warmup_steps": warmup, "steps": steps, "estimate_s": 60 if mode == "compile" else 10}
        if mode == "compile" and not use_compile:
            item["skipped"] = "torch.compile off for this run (--compile)"
        items.append(item)
    return items


def label(item: dict) -> str:
    return f"{item['preset']} B{item['batch']}xT{item['seq']} {item['mode']} use_fused={item['use_fused']}"


def run(item: dict, device: str) -> dict:
    """Trains `steps` steps after `warmup_steps` and returns the item with its figures
    (or with the error that stopped it)."""
    result = dict(item, label=label(item))
    if item.get("skipped"):
        return result
    try:
        result.update(_train_steps(item, device))
    except Exception as error:  # recorded, and the run goes on
        result["error"] = error_text(error)
    finally:
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _train_steps(item: dict, device: str) -> dict:
    from llm.config import GPTConfig
    from llm.model import GPT
    from llm.train import build_optimizer

    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = GPTConfig.from_preset(item["preset"], use_fused=item["use_fused"], **item["overrides"])
    model = GPT(config).to(device)
    # llm's own optimizer (fused AdamW on CUDA), with GPT-2's hyperparameters
    optimizer = build_optimizer(model, 6e-4, 0.1, (0.9, 0.95), device)
    step_model = torch.compile(model) if item["mode"] == "compile" else model
    batch, seq = item["batch"], item["seq"]
    inputs = torch.randint(0, config.vocab_size, (batch, seq), device=device)  # random tokens: timing only
    targets = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")  # CPU: fp32

    def step():
        with autocast:
            _, loss = step_model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(item["warmup_steps"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
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
    flops_per_token = model.flops_per_token()
    figures = {
        "ms_per_step": mean_ms,
        "samples_ms": [round(t, 4) for t in step_ms],
        "tokens_per_s": tokens_per_s,
        "warmup_s": warmup_s,
        "parameters": model.num_parameters(),
        "flops_per_token": flops_per_token,
        "optimizer": "llm.train.build_optimizer",
        "config": config.to_dict(),
        "mfu_peak_tflops": None,
        "mfu": None,
        "peak_memory_gib": None,
    }
    if device == "cuda":
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["mfu_peak_tflops"] = H100_PEAK_TFLOPS
        figures["mfu"] = tokens_per_s * flops_per_token / (H100_PEAK_TFLOPS * 1e12)
    return figures
