"""Retrieval-augmented answers: retrieve, screen, ground, answer, cite, log.

The prompt's system message carries the rules; the question and the numbered sources go in
the user's message. Below the relevance threshold (the best hit's relevance, see
llm.apps.index) the answer is NOT_FOUND without asking the model: a small model given
unrelated passages would make something up. Sources are added best first while the prompt
still leaves room for the answer in the model's context; a question that cannot fit even
without sources is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llm.apps.guardrails import Guardrails, Intervention
from llm.apps.index import DEFAULT_MIN_RELEVANCE, Hit

# Short, so that sources fit a small model's context: every token here is one less for them.
RULES = "Answer from the numbered sources only; cite them as [n]. If they lack the answer, say you do not know."
NOT_FOUND = "I don't know: nothing in the index is relevant enough to answer that."
SOURCE_CHARS = 600  # at most this much of each source goes into the prompt
MIN_SOURCE_CHARS = 40  # a source cut shorter than this says too little to include


@dataclass
class GroundedPrompt:
    prompt: object  # what render returned: token ids in the model's template
    user: str  # the user's message in it: the numbered sources, then the question
    hits: list[Hit]  # the sources in the prompt, numbered 1..n in this order


def source_block(sources: list[tuple[Hit, str]]) -> str:
    """Numbered source texts; their file names stay out of the prompt (tokens a small context
    cannot spare) and are printed and logged with the answer instead."""
    return "\n".join(f"[{n}] {text}" for n, (_, text) in enumerate(sources, start=1))


def ground(question: str, hits: list[Hit], render, count_tokens, budget: int) -> GroundedPrompt:
    """The prompt with as many of `hits` (best first) as fit in `budget` tokens; the last one
    that fits only in part is cut short. render(system, user) -> prompt (ids in the model's
    template); count_tokens(prompt) -> int."""

    def user(sources: list[tuple[Hit, str]]) -> str:
        return f"Sources:\n{source_block(sources)}\n\nQuestion: {question}" if sources else f"Question: {question}"

    def prompt(sources: list[tuple[Hit, str]]):
        return render(RULES, user(sources))

    if count_tokens(prompt([])) > budget:
        raise ValueError(f"the question takes {count_tokens(prompt([]))} tokens with the prompt, more than the "
                         f"{budget} the model's context leaves for it; ask a shorter question")
    used: list[tuple[Hit, str]] = []
    for hit in hits:
        text = " ".join(hit.chunk.text[:SOURCE_CHARS].split())
        if count_tokens(prompt(used + [(hit, text)])) > budget:
            low, high = 0, len(text)  # the longest prefix that fits: binary search on characters
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if count_tokens(prompt(used + [(hit, text[:middle])])) <= budget else (low, middle - 1)
            if low >= MIN_SOURCE_CHARS:
                used.append((hit, text[:low]))
            break
        used.append((hit, text))
    return GroundedPrompt(prompt(used), user(used), [hit for hit, _ in used])


@dataclass
class RagAnswer:
    question: str
    answer: str
    sources: list[Hit]
    finish_reason: str  # stop, length, content_filter, not_found (nothing relevant: the model was not asked)
    prompt: str = ""  # the prompt as text, for the log
    interventions: list[Intervention] = field(default_factory=list)
    latency_ms: float = 0.0

    def log_record(self, command: str, template: str) -> dict:
        return {"event": "rag_answer", "command": command, "template": template,
                "sources": [dict(h.summary(), text=h.chunk.text) for h in self.sources],
                "guardrails": [i.to_dict() for i in self.interventions], "finish_reason": self.finish_reason,
                "latency_ms": round(self.latency_ms, 1), "question": self.question, "prompt": self.prompt,
                "answer": self.answer}  # fmt: skip


def answer_question(question: str, index, model, k: int = 5, retrieve: str = "auto",
                    min_relevance: float | None = None, guardrails: Guardrails | None = None) -> RagAnswer:  # fmt: skip
    """Retrieve, screen the sources, ground and answer. `model`: a llm.apps.prompting.PromptedModel
    (render, count_tokens, budget, complete, text)."""
    started = time.perf_counter()
    guardrails = guardrails or Guardrails()
    guardrails.check_input(question)
    retriever = index.resolve_retriever(retrieve)
    threshold = DEFAULT_MIN_RELEVANCE[retriever] if min_relevance is None else min_relevance
    hits, interventions = guardrails.screen_sources(index.search(question, k, retriever))
    relevant = [h for h in hits if h.relevance >= threshold]
    if not relevant:
        return RagAnswer(question, NOT_FOUND, [], "not_found", "", interventions,
                         1000 * (time.perf_counter() - started))  # fmt: skip
    grounded = ground(question, relevant, model.render, model.count_tokens, model.budget)
    text, finish_reason, _ = model.complete(grounded.prompt)
    text, filtered = guardrails.filter_output(text)
    if filtered:
        finish_reason = "content_filter"
    return RagAnswer(question, text.strip(), grounded.hits, finish_reason, model.text(grounded.prompt),
                     interventions + filtered, 1000 * (time.perf_counter() - started))  # fmt: skip
