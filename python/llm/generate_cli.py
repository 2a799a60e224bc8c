"""llm-generate: print samples from a checkpoint or Hugging Face GPT-2 weights (sampling
and the KV cache are llm.generate).

    llm-generate --checkpoint out/ckpt.pt --prompt "ROMEO:" --stream
    llm-generate --gpt2-weights ./gpt2 --prompt "Hello" --top-p 0.9
    llm-generate --checkpoint out-instruct/ckpt.pt --prompt "Who speaks these lines?" --input "..."
    llm-generate --checkpoint out-instruct/ckpt.pt --system "Answer in one word." --examples shots.jsonl \
                 --prompt "Which play is this from?" --input "..." --policy policy.json

--system and --examples (few-shot instruction records, JSONL) go into the model's own
template: the system turn and earlier user/assistant turns (llm.apps.prompting); for a plain
language model, a text of "Input: ... / Output: ..." pairs to continue. --policy applies a
guardrail policy file (llm.apps.guardrails): a refused prompt is one line and exit status 2,
the output is printed once checked (redactions, withheld text), each intervention noted on
stderr with its rule.

An instruction model (checkpoint task "instruct") gets its prompt in the chat template it
was trained with (llm.chat_template, recorded in the checkpoint) and prints only its reply. --max-new-tokens is at
least 1 (a run that generates nothing is a mistake, not a request).
"""

from __future__ import annotations

import argparse
import sys

from llm.cli import SEED, command, device_name, existing_file, existing_path, float_in, int_in, new_parser
from llm.generate import stream_text
from llm.runtime import DEVICE_CHOICES

PROG = "llm-generate"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=existing_file,
                        help="a checkpoint written by llm-train or llm-finetune (ckpt.pt)")
    source.add_argument("--gpt2-weights", type=existing_path,
                        help="a Hugging Face GPT-2 save_pretrained folder (or one llm-export wrote)")
    parser.add_argument("--prompt", default="\n", help="the text to continue; for an instruction model, the instruction")
    parser.add_argument("--input", default=None, help="instruction models: the instruction's input (optional)")
    parser.add_argument("--system", default=None, help="a system message, in the model's template")
    parser.add_argument("--examples", type=existing_file, default=None,
                        help="few-shot examples: instruction records (JSONL), as earlier turns")  # fmt: skip
    parser.add_argument("--policy", type=existing_file, default=None, help="a guardrail policy file (JSON)")
    parser.add_argument("--max-new-tokens", type=int_in(1), default=200, help="at least 1")
    parser.add_argument("--temperature", type=float_in(0), default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int_in(1), default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float_in(0, 1, min_open=True), default=None,
                        help="sample from the most likely tokens that hold this much probability")  # fmt: skip
    parser.add_argument("--seed", type=SEED, default=1337, help="sample i uses seed + i")
    parser.add_argument("--num-samples", type=int_in(1), default=1)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_CHOICES)
    parser.add_argument("--use-fused", action="store_true", help="attention/LayerNorm/GELU via llmkernels")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence per token")
    return parser


@command(PROG)
def main(argv: list[str] | None = None) -> None:
    """Print samples: the prompt and its continuation, or for an instruction model (checkpoint
    task "instruct") the response to --prompt put in the instruction template."""
    from llm.apps.prompting import encode_prompt, read_examples
    from llm.chat_template import checkpoint_template
    from llm.checkpoint import checkpoint_task, load_checkpoint, model_from_checkpoint
    from llm.runtime import resolve_device
    from llm.weights import load_gpt2_with_tokenizer

    args = build_parser().parse_args(argv)
    task = "lm"
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        task = checkpoint_task(checkpoint)
        if task == "classify":
            raise ValueError(f"{args.checkpoint} is a classifier (task classify): it predicts labels, not text; "
                             "use llm-eval to measure it")
        model, tokenizer = model_from_checkpoint(checkpoint, use_fused=args.use_fused)
    else:
        model, tokenizer = load_gpt2_with_tokenizer(args.gpt2_weights, use_fused=args.use_fused)
    if args.input is not None and task != "instruct":
        raise ValueError("--input: only instruction models (llm-finetune --task instruct) take an input")
    examples = read_examples(args.examples) if args.examples else []
    guardrails = None
    if args.policy:
        from llm.apps.guardrails import Guardrails, load_policy

        guardrails = Guardrails(load_policy(args.policy))
        guardrails.check_input("\n".join(text for text in (args.system, args.prompt, args.input) if text))
    model.to(resolve_device(args.device))
    few_shot = bool(args.system or examples)
    if task == "instruct":
        template = checkpoint_template(checkpoint)
        user = template.instruction_messages(args.prompt, args.input or "")[0].content
        prompt_ids = encode_prompt(tokenizer, template, user, args.system, examples)
    elif few_shot:
        prompt_ids = encode_prompt(tokenizer, None, args.prompt, args.system, examples)
    else:
        prompt_ids = tokenizer.encode(args.prompt, allowed_special="all") or [tokenizer.eot_token]
    if len(prompt_ids) > model.config.context_length:  # before anything is printed
        raise ValueError(f"--prompt is {len(prompt_ids)} tokens{' in its template' if task == 'instruct' else ''}; "
                         f"the model's context holds {model.config.context_length}")
    for i in range(args.num_samples):
        pieces = stream_text(
            model, tokenizer, prompt_ids, args.max_new_tokens, seed=args.seed + i, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_kv_cache,
        )  # fmt: skip
        if task == "lm" and not few_shot:
            print(args.prompt, end="", flush=True)
        if guardrails:  # the whole text is checked before any of it is shown
            text, interventions = guardrails.filter_output("".join(pieces))
            for intervention in interventions:
                print(f"{PROG}: content policy: {intervention.rule} ({intervention.action}: {intervention.detail})",
                      file=sys.stderr)  # fmt: skip
            print(text)
        elif args.stream:
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
        else:
            print("".join(pieces))
        if i + 1 < args.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    main()
