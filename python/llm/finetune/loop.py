"""The fine-tuning loop shared by the three tasks: llm.train's optimizer, schedule, loss
curve and checkpoint format, plus what fine-tuning adds: frozen parameters, LoRA
adapters, a task head, and the before/after report.

out_dir/
  ckpt.pt      a plain llm checkpoint (LoRA merged in) that every command loads, with
               task, finetune_config and the state to resume exactly (optimizer, data
               position, RNG; "lora": the unmerged adapters, the base is re-read from init_from)
  adapters/    LoRA runs: the adapters (and classification head) alone
  loss.png, report.json, report.md, confusion.png (classify), answers.json (instruct)
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llm.checkpoint import check_existing_checkpoint, load_checkpoint, save_checkpoint
from llm.cli import shows_bar
from llm.data import BatchLoader
from llm.finetune.classify import GPTClassifier, classifier_state
from llm.finetune.config import ALL_BLOCKS, FinetuneConfig
from llm.finetune.lora import TARGET_MODULES, adapter_state, add_lora, load_adapter_state, merged_copy, save_adapters
from llm.finetune.report import write_report
from llm.finetune.tasks import make_task
from llm.interrupts import StopRequests, TrainingInterrupted
from llm.model import GPT
from llm.runtime import Distributed, autocast_for, gather_rng_states, resolve_device, restore_rng_states
from llm.tokenizer import tokenizer_to_dict
from llm.train import build_model, build_optimizer, save_loss_curve, training_step


def freeze_all_but_last(gpt: GPT, trainable_blocks: int) -> None:
    """Train only the last `trainable_blocks` blocks and the final LayerNorm (ALL_BLOCKS: everything)."""
    if trainable_blocks == ALL_BLOCKS:
        gpt.requires_grad_(True)
        return
    if not 0 <= trainable_blocks <= gpt.config.n_layer:
        raise ValueError(f"--trainable-blocks must be in [0, {gpt.config.n_layer}] or 'all', got {trainable_blocks}")
    gpt.requires_grad_(False)
    blocks = gpt.transformer.h
    for block in blocks[len(blocks) - trainable_blocks :]:
        block.requires_grad_(True)
    gpt.transformer.ln_f.requires_grad_(True)


def finetune(cfg: FinetuneConfig, resume_from: dict | None = None) -> dict:
    """Run (or resume) a fine-tune; returns {"history", "report": {"before", "after"}, "table"}.
    resume_from: with cfg.resume, the checkpoint if the caller has loaded it already (else it is read here).
    Raises TrainingInterrupted (after saving a checkpoint) on SIGINT / SIGTERM."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("llm-finetune runs in one process, not under torchrun; for plain text on many GPUs "
                         "use torchrun -m llm.train --init-from CHECKPOINT")
    device = resolve_device(cfg.device)
    log = tqdm.write  # evaluation lines always print; the bar only on a terminal or if asked
    out_dir = Path(cfg.out_dir)
    checkpoint_path = out_dir / "ckpt.pt"
    check_existing_checkpoint(cfg, checkpoint_path)
    resume_from = (resume_from or load_checkpoint(checkpoint_path)) if cfg.resume else None

    torch.manual_seed(cfg.seed)
    # A LoRA run resumes from its base model (init_from) plus the saved adapters.
    gpt, tokenizer = build_model(cfg, None if cfg.lora_rank else resume_from)
    context = gpt.config.context_length
    labels = resume_from["classifier"]["labels"] if resume_from is not None and cfg.task == "classify" else None
    task = make_task(cfg, tokenizer, context, labels)
    log(f"{cfg.task} data: {task.description}")
    model = task.model(gpt)
    initial_head = {k: v.clone() for k, v in model.head.state_dict().items()} if cfg.task == "classify" else None
    if cfg.lora_rank:
        add_lora(gpt, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    else:
        freeze_all_but_last(gpt, cfg.trainable_blocks)
    if isinstance(model, GPTClassifier):
        model.head.requires_grad_(True)
    if resume_from is not None:
        if cfg.lora_rank:
            load_adapter_state(gpt, resume_from["lora"]["adapters"], str(checkpoint_path))
        if isinstance(model, GPTClassifier):
            model.head.load_state_dict(resume_from["classifier"]["head"])
            initial_head = resume_from["classifier"]["initial_head"]
    model.to(device)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})"
        + (f", LoRA rank {cfg.lora_rank} on {', '.join(TARGET_MODULES)}" if cfg.lora_rank else ""))  # fmt: skip
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    loader = BatchLoader(task.train_set, cfg.batch_size, cfg.seed)
    autocast = autocast_for(device, cfg.dtype)
    step, history, before = 0, {"train_loss": [], "val_loss": []}, None
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        loader.load_state_dict(resume_from["data"])
        step, history, before = resume_from["step"], resume_from["history"], resume_from["evaluation"]["before"]
        restore_rng_states(resume_from["rng"], Distributed())
        log(f"resumed {cfg.task} fine-tune from {checkpoint_path} at step {step}")
    else:
        before = task.report(model, tokenizer, device, autocast)
        history["val_loss"].append([0, before["val"]["loss"]])
        log(f"step 0: val loss {before['val']['loss']:.4f}")

    def save() -> None:
        body = merged_copy(gpt) if cfg.lora_rank else gpt
        checkpoint = {
            "model": body.state_dict(),
            "model_config": gpt.config.to_dict(),
            "tokenizer": tokenizer_to_dict(tokenizer),
            "task": cfg.task,
            "finetune_config": dataclasses.asdict(cfg),
            "step": step,
            "optimizer": optimizer.state_dict(),
            "data": loader.state_dict(),
            "rng": gather_rng_states(Distributed()),
            "history": history,
            "evaluation": {"before": before},
        }
        if cfg.task == "instruct":
            checkpoint["chat_template"] = cfg.chat_template  # how every command prompts this model
        if isinstance(model, GPTClassifier):
            checkpoint["classifier"] = classifier_state(model, initial_head)
        if cfg.lora_rank:
            adapters = adapter_state(gpt)
            checkpoint["lora"] = {"adapters": adapters}
            head = {f"head.{k}": v for k, v in model.head.state_dict().items()} if isinstance(model, GPTClassifier) else {}
            save_adapters(out_dir / "adapters", {**adapters, **head}, {
                "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "target_modules": TARGET_MODULES, "task": cfg.task, "base_model": cfg.init_from,
                "labels": model.labels if isinstance(model, GPTClassifier) else None,
                "finetune_config": dataclasses.asdict(cfg),
            })  # fmt: skip
        save_checkpoint(checkpoint_path, checkpoint)
        save_loss_curve(history, out_dir / "loss.png")

    train_model = torch.compile(model) if cfg.compile else model
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not shows_bar(cfg.progress), dynamic_ncols=True)
    with StopRequests() as stop:
        while step < cfg.max_steps:
            started = time.perf_counter()
            lr, step_loss = training_step(train_model, optimizer, loader, task.loss, cfg, step, device, autocast)
            step += 1
            history["train_loss"].append(step_loss.item())
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", lr=f"{lr:.1e}",
                            s_per_step=f"{time.perf_counter() - started:.2f}")  # fmt: skip
            bar.update(1)
            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluated:
                val = task.metrics(model, "val", device, autocast)
                history["val_loss"].append([step, val["loss"]])
                log(f"step {step}: val loss {val['loss']:.4f}" + (f", accuracy {val['accuracy']:.1%}" if "accuracy" in val else ""))
                save()
            if stop.received is not None:  # even at the last step: the report can take minutes
                if not evaluated:
                    save()
                bar.close()
                raise TrainingInterrupted(stop.received, step, checkpoint_path)
    bar.close()

    after = task.report(model, tokenizer, device, autocast)
    table = write_report(out_dir, cfg.task, {"before": before, "after": after},
                         {"before": str(cfg.init_from), "after": str(checkpoint_path)})  # fmt: skip
    return {"history": history, "report": {"before": before, "after": after}, "table": table}
