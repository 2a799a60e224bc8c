"""The settings of one fine-tuning run. Stored in its checkpoint ("finetune_config"), so
`llm-finetune --resume` continues the same fine-tune (task, data, schedule, adapters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.chat_template import DEFAULT_TEMPLATE, TEMPLATES
from llm.checkpoint import TASKS
from llm.data import DEFAULT_DATA_DIR

DTYPES = ("auto", "float32", "bfloat16")
ALL_BLOCKS = -1


@dataclass
class FinetuneConfig:
    task: str = "lm"  # lm (plain text), classify or instruct
    init_from: str | None = None  # a checkpoint (.pt) or a Hugging Face GPT-2 folder
    # files, or one built-in dataset name; empty = the task's built-in Shakespeare data
    # (lm: the corpus, classify: shakespeare-genre, instruct: shakespeare-instruct)
    data: list[str] = field(default_factory=list)
    data_dir: str = str(DEFAULT_DATA_DIR)  # token cache (lm task)
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # classify / instruct hold out a test split too
    out_dir: str = "out-finetune"
    # model
    context_length: int | None = None  # None = the initial model's; shorter crops
    dropout: float = 0.0
    use_fused: bool = False
    compile: bool = False
    dtype: str = "auto"  # autocast: auto = bf16 on GPU, float32 on CPU
    # what trains: the last N blocks + final LayerNorm (+ head); ALL_BLOCKS = everything;
    # None = the task's default (classify: 1, lm and instruct: all). Ignored with LoRA.
    trainable_blocks: int | None = None
    lora_rank: int = 0  # 0 = no LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    train_on_prompt: bool = False  # instruct: keep the prompt tokens in the loss
    chat_template: str = DEFAULT_TEMPLATE  # instruct: llm.chat_template's name, recorded in the checkpoint
    # optimisation (as llm.train's TrainConfig, with fine-tuning's defaults)
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 200
    lr_decay_steps: int | None = None
    warmup_steps: int = 10
    lr: float = 1e-4
    min_lr: float | None = None  # None = lr / 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    resume: bool = False  # continue out_dir/ckpt.pt
    overwrite: bool = False  # replace an existing out_dir/ckpt.pt with a new fine-tune
    eval_interval: int = 50
    eval_batches: int = 8  # lm task: validation windows = eval_batches * batch_size
    answer_count: int = 30  # instruct: held-out prompts answered in the report
    answer_tokens: int = 48
    device: str = "auto"
    seed: int = 1337
    progress: bool | None = None  # the tqdm bar; None = only when stderr is a terminal

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.chat_template not in TEMPLATES:
            raise ValueError(f"chat_template must be one of {', '.join(TEMPLATES)}, got {self.chat_template!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("pass --resume (continue the checkpoint) or --overwrite (replace it), not both")
        if self.init_from is None and not self.resume:
            raise ValueError("--init-from is required: the checkpoint or GPT-2 folder to fine-tune")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.trainable_blocks is None:
            self.trainable_blocks = 1 if self.task == "classify" else ALL_BLOCKS
