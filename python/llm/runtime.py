"""Where a job runs: the device, bf16 autocast on GPUs, torchrun's processes and each
process's random generators (saved in checkpoints for an exact resume).

A leaf module (imports only torch), so training, generation, fine-tuning, evaluation
and serving all pick devices the same way without importing each other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}; expected {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: unsupported device {name!r}; expected {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def autocast_for(device: torch.device, dtype: str = "auto"):
    """dtype "auto": bf16 autocast on a GPU (tensor cores, fp32 master weights), nothing on CPU;
    "bfloat16" forces it (CPU too); "float32" turns it off (llm-finetune's --dtype)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Distributed:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL for a GPU job, gloo for a CPU job
    (even on a machine that has a GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def main_process_first(ddp: Distributed, fn):
    """fn() on rank 0, then on the other ranks: rank 0 fills the caches (the learned
    tokenizer, the token files) and the others read them instead of redoing the work."""
    if ddp.is_main:
        result = fn()
    if ddp.enabled:
        dist.barrier()
    if not ddp.is_main:
        result = fn()
    return result


def gather_rng_states(ddp: Distributed) -> list[dict]:
    """Every rank's generator states (CPU and, if present, CUDA), collected on all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if not ddp.enabled:
        return [state]
    states = [None] * ddp.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: list[dict], ddp: Distributed) -> None:
    """This rank's generator states from gather_rng_states' list (a resumed run needs the same world size)."""
    if len(states) != ddp.world_size:
        raise ValueError(
            f"the checkpoint was written by {len(states)} process(es); resume it with the same number, "
            f"not {ddp.world_size}"
        )
    torch.set_rng_state(states[ddp.rank]["cpu"])
    if "cuda" in states[ddp.rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[ddp.rank]["cuda"])
