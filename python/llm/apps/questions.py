"""Questions with gold passages, and how well retrieval and answers match them.

A question file is JSON lines: {"question", "answer", "source", "quote"}: the gold passage is
any chunk of `source` (a file name, or the end of its path) whose text contains `quote`. The
built-in demo set (assets/rag/demo_questions.jsonl) asks about well-known passages of the
Shakespeare corpus, so `llm-rag index` + `llm-rag eval` run with no files of your own.

  hit@k                share of questions with a gold chunk among the top k
  MRR                  mean of 1 / rank of the first gold chunk (0 when none in the top k)
  context containment  share whose top-k chunks contain the answer text (an upper bound for
                       an extractive reader)
  answer containment   share whose generated answer contains the expected answer
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llm.files import read_utf8

DEMO_QUESTIONS = Path(__file__).resolve().parents[1] / "assets" / "rag" / "demo_questions.jsonl"
FIELDS = ("question", "answer", "source", "quote")


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    source: str
    quote: str


def read_questions(path: str | Path | None = None) -> list[Question]:
    """The questions in a JSONL file; None = the built-in demo questions."""
    path = Path(path) if path else DEMO_QUESTIONS
    if not path.is_file():
        raise FileNotFoundError(f"questions file not found: {path}")
    questions = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) and record[f] for f in FIELDS):
            raise ValueError(f"{path}, line {number}: expected an object with non-empty strings {', '.join(FIELDS)}")
        questions.append(Question(*(record[f] for f in FIELDS)))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def normalized(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").casefold().split())


def is_gold(chunk, question: Question) -> bool:
    same_source = chunk.source == question.source or Path(chunk.source).name == question.source
    return same_source and normalized(question.quote) in normalized(chunk.text)


def contains_answer(text: str, answer: str) -> bool:
    return re.search(r"\b" + re.escape(normalized(answer)) + r"\b", normalized(text)) is not None


def retrieval_metrics(hits_per_question: list[list], questions: list[Question]) -> dict:
    """hit@k, MRR and context containment over the questions' ranked hits."""
    first_gold = [next((h.rank for h in hits if is_gold(h.chunk, q)), None) for hits, q in zip(hits_per_question, questions)]
    n = max(1, len(questions))
    return {
        "questions": len(questions),
        "hit_at_k": sum(r is not None for r in first_gold) / n,
        "mrr": sum(1 / r for r in first_gold if r is not None) / n,
        "context_containment": sum(any(contains_answer(h.chunk.text, q.answer) for h in hits)
                                   for hits, q in zip(hits_per_question, questions)) / n,  # fmt: skip
    }
