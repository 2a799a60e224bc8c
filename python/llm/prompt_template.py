"""The one instruction prompt template (Alpaca's), shared by instruction fine-tuning,
`llm-generate` and `llm-serve`'s chat endpoint, so a model is prompted the way it was trained.

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:            <- only when the record has a non-empty input
    {input}

    ### Response:
    {output}<|endoftext|>   <- the training target; at inference the model writes it
"""

from __future__ import annotations

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_MARKER = "### Response:\n"


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt up to and including the response marker; the response follows it."""
    prompt = f"{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n"
    if input:
        prompt += f"### Input:\n{input}\n\n"
    return prompt + RESPONSE_MARKER
