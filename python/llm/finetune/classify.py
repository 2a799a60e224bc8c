"""Classification fine-tuning: the GPT's LM head replaced by an n-class head.

The head reads the final hidden state of each sequence's last real token: with causal
attention that is the only position that has seen the whole text, and padding placed
after it cannot change it. The loss is cross-entropy over the classes.

A classifier checkpoint is an ordinary llm checkpoint (its "model" is the GPT body) plus
  task        "classify"
  classifier  {"labels": [...], "head": head state, "initial_head": the head before
               training, so llm-eval can re-measure the starting point}
"""

from __future__ import annotations

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.finetune.datasets import LabelledText
from llm.model import GPT
from llm.plots import new_figure, save_png


class GPTClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str]):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"classification needs at least 2 labels, found {labels}")
        self.gpt = gpt
        self.labels = list(labels)
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids, right-padded; lengths (B,) real tokens per row -> logits (B, K)."""
        hidden = self.gpt.hidden_states(idx)  # (B, T, C)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, T, C) -> (B, C)
        return self.head(last)  # (B, C) -> (B, K)


def classifier_state(model: GPTClassifier, initial_head: dict) -> dict:
    """The checkpoint's "classifier" entry."""
    return {"labels": model.labels, "head": model.head.state_dict(), "initial_head": initial_head}


def classifier_from_checkpoint(gpt: GPT, checkpoint: dict, head_key: str = "head") -> GPTClassifier:
    """The GPT body with the checkpoint's head (or, head_key="initial_head", its starting head)."""
    entry = checkpoint.get("classifier")
    if not isinstance(entry, dict) or head_key not in entry:
        raise ValueError('the checkpoint says task "classify" but has no classifier head')
    model = GPTClassifier(gpt, entry["labels"])
    model.head.load_state_dict(entry[head_key])
    return model


class ClassificationSet:
    """Tokenised (text, label) examples, truncated to the context; batches padded to their
    longest row. `num_windows` and `batch(indices, device)` are what llm.data.BatchLoader reads."""

    def __init__(self, examples: list[LabelledText], labels: list[str], tokenizer: tiktoken.Encoding, context: int):
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({e.label for e in examples} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the model's labels {labels}")
        self.tokens = [ids[:context] or [tokenizer.eot_token] for ids in tokenizer.encode_ordinary_batch([e.text for e in examples])]
        self.targets = [index[e.label] for e in examples]
        self.pad_token = tokenizer.eot_token
        self.num_windows = len(self.tokens)

    def batch(self, indices, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T) padded with <|endoftext|>, lengths (B,), labels (B,)."""
        rows = [self.tokens[i] for i in indices]
        x = collate_classification(rows, self.pad_token)
        lengths = torch.tensor([len(r) for r in rows])
        labels = torch.tensor([self.targets[i] for i in indices])
        return x.to(device), lengths.to(device), labels.to(device)


def collate_classification(rows: list[list[int]], pad_token: int) -> torch.Tensor:
    """Token lists -> (B, longest) right-padded with pad_token."""
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [pad_token] * (longest - len(r)) for r in rows])


def classification_loss(model: GPTClassifier, batch) -> torch.Tensor:
    x, lengths, labels = batch
    return F.cross_entropy(model(x, lengths).float(), labels)


@torch.no_grad()
def classification_metrics(model: GPTClassifier, data: ClassificationSet, batch_size: int, device, autocast) -> dict:
    """Loss, accuracy and the confusion matrix (rows: true label, columns: predicted) over all of `data`."""
    was_training = model.training
    model.eval()
    K = len(model.labels)
    # Counted and summed on the device, read once at the end (not a wait for the device per batch).
    confusion = torch.zeros(K * K, dtype=torch.long, device=device)
    loss_sums = []
    for start in range(0, data.num_windows, batch_size):
        x, lengths, labels = data.batch(range(start, min(start + batch_size, data.num_windows)), device)
        with autocast:
            logits = model(x, lengths).float()  # (B, K)
        loss_sums.append(F.cross_entropy(logits, labels, reduction="sum"))
        predicted = logits.argmax(dim=-1)  # (B,)
        confusion += torch.bincount(labels * K + predicted, minlength=K * K)
    model.train(was_training)
    confusion = confusion.view(K, K).cpu()
    n = data.num_windows
    return {
        "examples": n,
        "loss": sum(torch.stack(loss_sums).tolist()) / n,
        "accuracy": confusion.diag().sum().item() / n,
        "majority_class_accuracy": majority_class_accuracy(confusion.tolist()),
        "labels": model.labels,
        "confusion": confusion.tolist(),
    }


def save_confusion_plot(panels: dict[str, dict], path) -> None:
    """One confusion-matrix heat map per panel (e.g. "test, before" and "test, after"), as a PNG."""
    K = len(next(iter(panels.values()))["labels"])
    size = 2.5 + 0.35 * K
    figure, axes = new_figure(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for axis, (title, metrics) in zip(axes[0], panels.items()):
        counts = np.array(metrics["confusion"], dtype=float)
        axis.imshow(counts, cmap="Blues")
        axis.set_title(f"{title}: accuracy {metrics['accuracy']:.1%}")
        axis.set_xticks(range(K), metrics["labels"], rotation=90 if K > 4 else 0, fontsize=8)
        axis.set_yticks(range(K), metrics["labels"], fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        if K <= 12:
            for i in range(K):
                for j in range(K):
                    axis.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                              color="white" if counts[i, j] > counts.max() / 2 else "black")  # fmt: skip
    figure.tight_layout()
    save_png(figure, path)


def majority_class_accuracy(confusion: list[list[int]]) -> float:
    """Accuracy of always predicting the most common true label: the chance level to beat."""
    row_totals = [sum(row) for row in confusion]
    return max(row_totals) / sum(row_totals)
