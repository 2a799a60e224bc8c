"""llm-rag: retrieval-augmented generation over your documents, offline.

    llm-rag index --out rag-index                          # the built-in Shakespeare corpus, BM25
    llm-rag index notes/ 'docs/*.md' --out my-index --chunk-tokens 128 --overlap-tokens 32
    llm-rag index --out dense-index --embedder ./all-MiniLM-L6-v2   # + sentence embeddings (hybrid)
    llm-rag ask --index rag-index --checkpoint out/ckpt.pt "Whom does Antony come to bury?"
    llm-rag eval --index rag-index                         # hit@k, MRR on the built-in questions
    llm-rag eval --index rag-index --questions qa.jsonl --checkpoint out/ckpt.pt

index  reads text and Markdown files, folders and globs (none = the built-in corpus), cuts
       them into overlapping token chunks and writes an index folder (llm.apps.index).
ask    retrieves the top-k chunks, drops sources that carry prompt-injection phrases, and
       below --min-relevance answers that it does not know; otherwise it prompts the model
       with the numbered sources (in the model's template) and prints the answer and its
       sources. The policy file (--policy, llm.apps.guardrails) applies to the question and
       the answer; --log appends one JSON line per answer (content only with --log-content).
eval   retrieval hit@k, MRR and context containment against gold passages (questions as
       JSON lines: question, answer, source, quote; default: the built-in demo set), and with
       --checkpoint the share of answers containing the expected answer. Prints a table and
       writes report.json to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llm.cli import command, device_name, existing_path, float_in, int_in, new_parser, shows_bar
from llm.files import write_text

PROG = "llm-rag"


def add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    from llm.runtime import DEVICE_CHOICES

    parser.add_argument("--checkpoint", required=required, type=existing_path,
                        help="the model that answers: an llm checkpoint (.pt) or a GPT-2 folder")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int_in(1), default=48)
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_CHOICES)


def add_retrieval_options(parser: argparse.ArgumentParser) -> None:
    from llm.apps.index import RETRIEVERS

    parser.add_argument("--index", required=True, help="an index folder written by llm-rag index")
    parser.add_argument("--top-k", type=int_in(1, 100), default=5)
    parser.add_argument("--retriever", choices=RETRIEVERS, default="auto",
                        help="auto = hybrid when the index has embeddings, else bm25")  # fmt: skip
    parser.add_argument("--embedder", default=None, help="must be the index's own (default: the one it records)")
    parser.add_argument("--min-relevance", type=float_in(), default=None,
                        help="below this the answer is 'I don't know' (default: bm25 3.0, cosine 0.3)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from llm.apps.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS

    parser = new_parser(PROG, __doc__)
    actions = parser.add_subparsers(dest="action", required=True, metavar="{index,ask,eval}")
    index = actions.add_parser("index", help="build an index folder from documents")
    index.add_argument("documents", nargs="*", help="files, folders or globs (none = the built-in corpus)")
    index.add_argument("--out", required=True, help="the index folder to write")
    index.add_argument("--chunk-tokens", type=int_in(8, 4096), default=DEFAULT_CHUNK_TOKENS)
    index.add_argument("--overlap-tokens", type=int_in(0), default=DEFAULT_OVERLAP_TOKENS)
    index.add_argument("--embedder", default=None, help="a sentence-transformers model folder or id (dense + hybrid)")
    index.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")

    ask = actions.add_parser("ask", help="answer a question from the index")
    ask.add_argument("question")
    add_retrieval_options(ask)
    add_model_options(ask, required=True)
    ask.add_argument("--policy", default=None, help="guardrail policy file (JSON; default: the built-in policy)")
    ask.add_argument("--log", default=None, help="append one JSON line per answer to this file")
    ask.add_argument("--log-content", action="store_true", help="the log includes questions, prompts and answers")

    evaluate = actions.add_parser("eval", help="retrieval hit@k / MRR (and answer containment) on questions")
    add_retrieval_options(evaluate)
    evaluate.add_argument("--questions", default=None, help="JSONL question file (default: the built-in demo set)")
    add_model_options(evaluate, required=False)
    evaluate.add_argument("--out-dir", default=None, help="default: eval/ inside the index folder")
    return parser


def run_index(args) -> None:
    from llm.apps.chunking import read_documents
    from llm.apps.embedders import SentenceEmbedder
    from llm.apps.index import RetrievalIndex

    if args.overlap_tokens >= args.chunk_tokens:
        raise ValueError(f"--overlap-tokens ({args.overlap_tokens}) must be smaller than --chunk-tokens "
                         f"({args.chunk_tokens})")
    RetrievalIndex.check_destination(args.out, args.overwrite)  # before the work, not after it
    started = time.perf_counter()
    documents = read_documents(args.documents)
    embedder = SentenceEmbedder(args.embedder) if args.embedder else None
    index = RetrievalIndex.build(documents, args.chunk_tokens, args.overlap_tokens, embedder=embedder,
                                 show_progress=shows_bar(None))  # fmt: skip
    index.save(args.out, overwrite=args.overwrite)
    kinds = " + ".join(index.manifest["retrievers"])
    print(f"indexed {len(documents)} documents as {len(index.chunks)} chunks of {args.chunk_tokens} tokens "
          f"({args.overlap_tokens} overlap), {kinds}, in {time.perf_counter() - started:.1f} s -> {args.out}")


def rag_answerer(args, index, model, guardrails):
    from llm.apps.grounding import answer_question

    def answer(question: str):
        return answer_question(question, index, model, args.top_k, args.retriever, args.min_relevance, guardrails)

    return answer


def run_ask(args) -> None:
    from llm.apps.app_log import AppLog
    from llm.apps.guardrails import Guardrails, PolicyViolation, load_policy
    from llm.apps.index import RetrievalIndex
    from llm.apps.prompting import load_prompted_model

    guardrails = Guardrails(load_policy(args.policy))
    log = AppLog(args.log, args.log_content)
    try:
        guardrails.check_input(args.question)  # before loading anything
    except PolicyViolation as refusal:
        log.write({"event": "refused", "command": PROG, "guardrails": [refusal.intervention.to_dict()],
                   "question": args.question})  # fmt: skip
        raise
    index = RetrievalIndex.load(args.index, args.embedder)
    model = load_prompted_model(args.checkpoint, args.device, max_new_tokens=args.max_new_tokens)
    result = rag_answerer(args, index, model, guardrails)(args.question)
    log.write(result.log_record(PROG, model.template))
    print(result.answer)
    if result.sources:
        print("\nSources:")
        for n, hit in enumerate(result.sources, start=1):
            print(f"[{n}] {hit.chunk.source} characters {hit.chunk.start}-{hit.chunk.end} (relevance {hit.relevance:.3f})")


def run_eval(args) -> None:
    from llm.apps.guardrails import Guardrails
    from llm.apps.index import RetrievalIndex
    from llm.apps.prompting import load_prompted_model
    from llm.apps.questions import contains_answer, read_questions, retrieval_metrics

    questions = read_questions(args.questions)
    index = RetrievalIndex.load(args.index, args.embedder)
    retriever = index.resolve_retriever(args.retriever)
    hits = [index.search(q.question, args.top_k, retriever) for q in questions]
    report = {"index": str(args.index), "retriever": retriever, "k": args.top_k,
              "retrieval": retrieval_metrics(hits, questions)}  # fmt: skip
    rows = [("hit@%d" % args.top_k, report["retrieval"]["hit_at_k"]), ("MRR", report["retrieval"]["mrr"]),
            ("context containment", report["retrieval"]["context_containment"])]  # fmt: skip
    if args.checkpoint:
        model = load_prompted_model(args.checkpoint, args.device, max_new_tokens=args.max_new_tokens)
        answer = rag_answerer(args, index, model, Guardrails())
        answers = [answer(q.question) for q in questions]
        contained = sum(contains_answer(a.answer, q.answer) for a, q in zip(answers, questions)) / len(questions)
        not_found = sum(a.finish_reason == "not_found" for a in answers) / len(questions)
        report["answers"] = {"checkpoint": args.checkpoint, "answer_containment": contained, "not_found": not_found,
                             "examples": [{"question": q.question, "expected": q.answer, "answer": a.answer}
                                          for q, a in zip(questions, answers)]}  # fmt: skip
        rows += [("answer containment", contained), ("answered 'I don't know'", not_found)]
    out_dir = Path(args.out_dir or Path(args.index) / "eval")
    write_text(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    table = [f"| {retriever} retrieval, {len(questions)} questions | value |", "|---|---|"]
    table += [f"| {name} | {value:.3f} |" for name, value in rows]
    print("\n".join(table))
    print(f"report: {out_dir / 'report.json'}")


@command(PROG)
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    {"index": run_index, "ask": run_ask, "eval": run_eval}[args.action](args)


if __name__ == "__main__":
    main()
