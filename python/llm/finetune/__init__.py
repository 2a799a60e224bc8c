"""Fine-tuning a trained GPT, as people learn it: a classifier, an instruction follower, or
more of the same plain text; fully or with LoRA adapters; measured before and after.

  config.py       FinetuneConfig: one run's settings (stored in its checkpoint)
  datasets.py     reading CSV/TSV (label, text) and JSON/JSONL instruction files; splits
  shakespeare.py  built-in datasets from the package's Shakespeare corpus
  classify.py     GPTClassifier (n-class head at the last real token), metrics, confusion plot
  instruct.py     prompt template encoding, masked-loss collate, generated answers
  lora.py         LoRA adapters through peft: add, merge, save and load alone
  tasks.py        lm / classify / instruct behind one interface
  loop.py         the training loop, checkpoints, resume, before/after report
  report.py       report.json / report.md / confusion.png / answers.json
  cli.py          the llm-finetune command (python -m llm.finetune)
"""

from llm.finetune.cli import main
from llm.finetune.config import FinetuneConfig
from llm.finetune.loop import finetune

__all__ = ["FinetuneConfig", "finetune", "main"]
