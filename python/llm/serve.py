"""llm-serve: serve a model over HTTP with OpenAI-shaped endpoints (FastAPI + uvicorn).

    llm-serve --checkpoint out/ckpt.pt                       # a checkpoint of llm-train / llm-finetune
    llm-serve --checkpoint ./gpt2 --device cuda --use-fused  # a Hugging Face GPT-2 folder
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_tokens": 40}'

    llm-serve --checkpoint out/ckpt.pt --api-key "$KEY" --requests-per-minute 60 --tokens-per-minute 20000

The model loads once; requests are decoded together, one forward per step for all of
them (see llm.serving.engine). Endpoints, limits and errors: llm.serving.app. Chat with
--rag-index (grounded answers, "sources" in the response), --policy (guardrails),
--app-log, and OpenAI "tools": llm.serving.applications. SIGTERM or
Ctrl-C: no new requests (503), those in flight get --drain-timeout seconds, exit status 0.
With API keys (--api-key, LLM_SERVE_API_KEYS, --api-key-file) every /v1/* request needs
one, and the server listens on every interface unless --host says otherwise; without keys
it listens on 127.0.0.1 only unless --host is given. One JSON line per request goes to stderr.
"""

from __future__ import annotations

import logging

from llm.cli import command, device_name, existing_file, existing_path, float_in, int_in, new_parser
from llm.runtime import DEVICE_CHOICES
from llm.serving.auth import KEYS_ENV, load_api_keys
from llm.serving.engine import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S

PROG = "llm-serve"


def build_parser():
    parser = new_parser(PROG, __doc__)
    parser.add_argument("--checkpoint", "--ckpt", dest="checkpoint", required=True,
                        help="an llm checkpoint file (task lm or instruct) or a Hugging Face GPT-2 folder")
    parser.add_argument("--host", help="address to listen on (0.0.0.0: every interface; default: 0.0.0.0 with "
                                       "API keys, 127.0.0.1 without)")
    parser.add_argument("--port", type=int_in(0, 65535), default=8000, help="0 = any free port")
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_CHOICES)
    parser.add_argument("--use-fused", action="store_true", help="attention/LayerNorm/GELU via llmkernels")
    parser.add_argument("--max-concurrency", type=int_in(1, 1024), default=DEFAULT_MAX_CONCURRENCY,
                        help="requests decoded at once, batched into one forward per step; each holds a "
                             "full-context KV cache row (gpt2, fp32: 75 MB) (default %(default)s)")
    parser.add_argument("--queue", type=int_in(0, 100_000), default=DEFAULT_QUEUE,
                        help="requests waiting beyond --max-concurrency before 429 (default %(default)s)")
    parser.add_argument("--timeout", type=float_in(0, min_open=True), default=DEFAULT_TIMEOUT_S,
                        help="seconds a request may take, queueing included (default %(default)s)")
    parser.add_argument("--drain-timeout", type=float_in(0), default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM / Ctrl-C, seconds the requests in flight may still take (default %(default)s)")
    parser.add_argument("--model-name", help="the model id clients pass (default: the --checkpoint file or folder name)")
    parser.add_argument("--api-key", action="append", metavar="KEY",
                        help=f"a key clients must send as 'Authorization: Bearer KEY' (repeatable; also "
                             f"{KEYS_ENV}=k1,k2 and --api-key-file)")
    parser.add_argument("--api-key-file", type=existing_file, metavar="FILE",
                        help="accepted keys, one a line (# comments allowed)")
    parser.add_argument("--requests-per-minute", type=int_in(1, 10**9), metavar="N",
                        help="per client (API key, else address): requests a minute, as a token bucket (default: no limit)")
    parser.add_argument("--tokens-per-minute", type=int_in(1, 10**12), metavar="N",
                        help="per client: prompt + max_tokens a minute (unused tokens come back; default: no limit)")
    parser.add_argument("--log-content", action="store_true",
                        help="put prompts and completions in the JSON request log (off: users' text is not logged)")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's and the JSON request log's (info: one line per request; warning: none)")
    applications = parser.add_argument_group("applications (chat; see llm.serving.applications)")
    applications.add_argument("--rag-index", type=existing_path, default=None,
                              help="answer chat from this llm-rag index; the sources come back in 'sources'")  # fmt: skip
    applications.add_argument("--policy", type=existing_file, default=None,
                              help="a guardrail policy file (JSON) for chat; /v1/completions is then refused (403)")
    applications.add_argument("--app-log", default=None, help="append one JSON line per chat answer to this file")
    applications.add_argument("--app-log-content", action="store_true", help="the log includes messages and answers")
    return parser


def chat_applications(args):
    """Guardrails, grounding and the application log from the options (llm.serving.applications)."""
    from llm.apps.app_log import AppLog
    from llm.apps.guardrails import Guardrails, load_policy
    from llm.apps.index import RetrievalIndex
    from llm.serving.applications import ChatApplications

    return ChatApplications(Guardrails(load_policy(args.policy)) if args.policy else None,
                            RetrievalIndex.load(args.rag_index) if args.rag_index else None,
                            AppLog(args.app_log, args.app_log_content))  # fmt: skip


@command(PROG)
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:  # after parsing, so --help and bad options answer at once
        from llm.serving.app import create_app, kernel_backends
        from llm.serving.loading import load_served_model
        from llm.serving.request_log import log_startup, log_to_stderr
        from llm.serving.server import serve
    except ImportError as error:
        raise ValueError(f"{error.name} is not installed; llm-serve needs pip install 'llmkernels[serve]'") from None

    # The server's own lines (engine failures, draining) at --log-level, beside uvicorn's.
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    keys = load_api_keys(args.api_key or [], args.api_key_file)
    host = args.host or ("0.0.0.0" if keys else "127.0.0.1")
    served = load_served_model(args.checkpoint, device=args.device, use_fused=args.use_fused, name=args.model_name)
    limits = dict(max_concurrency=args.max_concurrency, queue_size=args.queue, timeout_s=args.timeout,
                  drain_timeout_s=args.drain_timeout, requests_per_minute=args.requests_per_minute,
                  tokens_per_minute=args.tokens_per_minute)
    app = create_app(served, **limits, api_keys=keys, log_content=args.log_content,
                     applications=chat_applications(args))
    print(f"{PROG}: serving {served.name!r} ({served.task}, {served.model.num_parameters():,} parameters) "
          f"on {served.device}", flush=True)
    if not keys:
        print(f"{PROG}: no API keys: anyone who can reach {host} may use the server"
              + ("; listening on 127.0.0.1 only (--host to change)" if args.host is None else ""), flush=True)
    log_to_stderr(args.log_level)
    log_startup(model=served.name, task=served.task, parameters=served.model.num_parameters(),
                device=served.device, use_fused=served.use_fused, kernel_backends=kernel_backends(served),
                host=host, port=args.port, api_keys=len(keys), log_content=args.log_content, **limits)
    serve(app, host=host, port=args.port, log_level=args.log_level, access_log=False)  # ours: JSON lines
    print(f"{PROG}: stopped", flush=True)


if __name__ == "__main__":
    main()
