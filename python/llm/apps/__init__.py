"""Applications built on a trained model: prompting, retrieval (chunking, embedders, the
index), grounded prompts, tools with a whitelist, guardrails and the application log.

  prompting.py        system message + few-shot examples in the model's template; completions
  prompt_variants.py  prompt variants measured over one labelled set (llm-eval --prompts)
  chunking.py         documents -> token chunks with overlap, each with its source and offsets
  embedders.py        dense sentence embeddings (sentence-transformers), identified and checked
  index.py            the retrieval index folder: BM25 (bm25s), dense, or both fused by rank
  grounding.py        a question + retrieved sources -> a prompt that fits the context; "I don't know"
  questions.py        questions with gold passages (built in: over the Shakespeare corpus), metrics
  calculator.py       arithmetic on a parsed expression tree (never eval)
  tools.py            the tool registry, the whitelist, argument schemas, time limits
  tool_use.py         the generate -> call -> result -> generate loop, at most N calls
  guardrails.py       the policy file: input checks, injection phrases, output redaction
  app_log.py          one JSON line per answer: template, sources, tools, guardrails, latency
"""
