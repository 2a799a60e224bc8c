"""python -m benchmarks serve: load test of llm-serve (tokens/s, requests/s, latency p50/p99).

Starts `llm-serve` in its own process (so the load generator does not share its GIL) with
a random-weight model -- random weights cost exactly what trained ones do -- and, for each
--clients level (default 1, 8 and 32 concurrent clients), sends --requests completions
(at least two per client), each a prompt of about --prompt-tokens tokens and --max-tokens
new tokens. The server decodes up to --max-concurrency requests (default: the most
clients) in one batched forward per step, so the table shows what batching buys as the
load grows; "rows/step" is the mean batch a decode step ran.

    python -m benchmarks serve                       # tiny model on CPU; gpt2 (124M) on a GPU
    python -m benchmarks serve --model gpt2 --device cuda --requests 256

Writes results.json, results.md and latency.png to --out (default
benchmarks/results/<date>-<time>-serve-<device>, so runs on the same day keep apart).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from llm.checkpoint import save_checkpoint
from llm.cli import int_in
from llm.config import GPTConfig
from llm.files import write_text
from llm.model import GPT
from llm.plots import save_png
from llm.serving.launch import serve_in_subprocess
from llm.tokenizer import gpt2_tokenizer, tokenizer_to_dict, train_bpe

from .measure import REPO_ROOT, device_slug, environment, resolve_device_and_model
from .report import fmt

# Prompts are cut from this text; the tiny model's 512-token BPE is learned on it (a small
# vocabulary, as the "tiny" preset's learned one).
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters. ")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", choices=("auto", "tiny", "gpt2"), default="auto",
                        help="auto: gpt2 (124M) on a GPU, the tiny preset on CPU")
    parser.add_argument("--requests", type=int_in(1, 100_000), default=64,
                        help="requests per --clients level (at least two per client)")
    parser.add_argument("--clients", type=int_in(1, 1024), action="append",
                        help="concurrent clients (repeatable; default 1, 8 and 32)")
    parser.add_argument("--prompt-tokens", type=int_in(1, 512), default=32)
    parser.add_argument("--max-tokens", type=int_in(1, 512), default=32)
    parser.add_argument("--max-concurrency", type=int_in(1, 1024), default=None,
                        help="the server's --max-concurrency (default: the most --clients)")
    parser.add_argument("--use-fused", action="store_true", help="serve with --use-fused")
    parser.add_argument("--out", type=Path, help="output folder")
    args = parser.parse_args(argv)
    resolve_device_and_model(parser, args)
    args.clients = list(dict.fromkeys(args.clients or [1, 8, 32]))
    args.max_concurrency = args.max_concurrency or max(args.clients)
    return args


def write_random_checkpoint(path: Path, preset: str, context: int):
    """A checkpoint of the preset's shape (its context at least `context`) with random
    weights; returns its tokenizer and parameter count."""
    tokenizer = gpt2_tokenizer() if preset == "gpt2" else train_bpe([TEXT], 512)
    torch.manual_seed(0)
    context = max(context, GPTConfig.from_preset(preset).context_length)
    config = GPTConfig.from_preset(preset, vocab_size=tokenizer.n_vocab, context_length=context)
    model = GPT(config)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": config.to_dict(),
                           "tokenizer": tokenizer_to_dict(tokenizer), "step": 0})
    return tokenizer, model.num_parameters()


def make_prompts(tokenizer, count: int, prompt_tokens: int) -> list[str]:
    """Different windows of TEXT, each cut to prompt_tokens tokens (plain ASCII, so the
    server's re-encoding of it is about as long)."""
    ids = tokenizer.encode(TEXT * (1 + 4 * prompt_tokens // len(TEXT)))
    step = max(1, (len(ids) - prompt_tokens) // count)
    return [tokenizer.decode(ids[(i * step) % (len(ids) - prompt_tokens):][:prompt_tokens]) for i in range(count)]


async def load(base_url: str, prompts: list[str], clients: int, max_tokens: int, progress) -> list[dict]:
    """Every prompt sent once, `clients` at a time; per request its status, latency and usage."""
    results, next_prompt = [], iter(enumerate(prompts))

    async def client_loop(client: httpx.AsyncClient):
        for i, prompt in next_prompt:
            start = time.perf_counter()
            response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                                  "temperature": 1.0, "seed": i})
            latency = time.perf_counter() - start
            usage = response.json().get("usage", {}) if response.status_code == 200 else {}
            results.append({"status": response.status_code, "latency_s": latency,
                            "completion_tokens": usage.get("completion_tokens", 0)})
            progress.update()

    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(args, ckpt: Path, prompts: list[str]) -> list[dict]:
    """One server; every --clients level in turn against it."""
    from tqdm import tqdm

    server_args = ["--checkpoint", str(ckpt), "--device", args.device, "--max-concurrency", str(args.max_concurrency),
                   "--queue", str(max(args.clients)), "--timeout", "3600", "--log-level", "warning"]
    results = []
    with serve_in_subprocess(server_args + (["--use-fused"] if args.use_fused else [])) as server:
        with tqdm(total=2, desc="warm-up", file=sys.stderr, leave=False) as progress:
            asyncio.run(load(server.base_url, prompts[:2], 2, args.max_tokens, progress))
        for clients in args.clients:
            sent = prompts[: max(args.requests, 2 * clients)]
            before = httpx.get(f"{server.base_url}/health", timeout=30).json()
            with tqdm(total=len(sent), desc=f"{clients} clients", unit="req", file=sys.stderr) as progress:
                start = time.perf_counter()
                outcomes = asyncio.run(load(server.base_url, sent, clients, args.max_tokens, progress))
                wall_s = time.perf_counter() - start
            after = httpx.get(f"{server.base_url}/health", timeout=30).json()
            results.append(summarize(clients, outcomes, wall_s, before, after))
    return results


def summarize(clients: int, outcomes: list[dict], wall_s: float, before: dict, after: dict) -> dict:
    ok = [r for r in outcomes if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    steps = after["decode_steps"] - before["decode_steps"]
    decoded = (after["tokens_generated"] - before["tokens_generated"]) - (after["prefills"] - before["prefills"])
    return {
        "clients": clients, "requests": len(outcomes), "ok": len(ok),
        "other_status": sorted({r["status"] for r in outcomes if r["status"] != 200}),
        "wall_s": wall_s, "requests_per_s": len(ok) / wall_s, "completion_tokens": tokens, "tokens_per_s": tokens / wall_s,
        "latency_p50_s": percentile(latencies, 50) if ok else None,
        "latency_p99_s": percentile(latencies, 99) if ok else None,
        "rows_per_step": decoded / steps if steps else None,  # each decode step makes one token per row
        "latencies_s": [round(x, 5) for x in latencies],
    }


def markdown(run: dict) -> str:
    s = run["settings"]
    lines = [
        f"# llm-serve load test: {run['env']['device']}",
        "",
        f"{s['model']} ({run['parameters']:,} parameters, random weights), server --max-concurrency "
        f"{s['max_concurrency']}, prompt ~{s['prompt_tokens']} tokens, {s['max_tokens']} new tokens "
        f"(temperature 1), use_fused={s['use_fused']}. Wall-clock over HTTP on loopback; "
        f"{'CPU figures, not GPU ones' if run['mode'] == 'cpu' else 'GPU'}"
        f" ({run['env']['cpu_count']} CPU cores). git {run['env']['git_commit']}.",
        "",
        "| concurrent clients | ok / sent | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | rows/step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        lines.append(f"| {r['clients']} | {r['ok']} / {r['requests']} | {fmt(r['tokens_per_s'])} | "
                     f"{fmt(r['requests_per_s'])} | {fmt(r['latency_p50_s'])} | {fmt(r['latency_p99_s'])} | "
                     f"{fmt(r['rows_per_step'])} |")
    return "\n".join(lines) + "\n"


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in run["results"]:
        latencies = sorted(r["latencies_s"])
        left.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))],
                  label=f"{r['clients']} clients")
    left.set_xlabel("request latency (s)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency CDF")
    left.legend()
    left.grid(alpha=0.3)
    labels = [str(r["clients"]) for r in run["results"]]
    right.bar(labels, [r["tokens_per_s"] for r in run["results"]], color="tab:gray")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("generated tokens/s")
    right.set_title("throughput")
    fig.suptitle(f"llm-serve, {run['settings']['model']} on {run['env']['device']}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = environment(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or REPO_ROOT / "benchmarks" / "results" / f"{started:%Y-%m-%d-%H%M%S}-serve-{device_slug(env)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"schema": 1, "started": started.isoformat(timespec="seconds"), "mode": args.device, "env": env,
           "command": ["python", "-m", "benchmarks", "serve", *(sys.argv[1:] if argv is None else argv)],
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.model}-random.pt"
        context = args.prompt_tokens + args.max_tokens + 8  # + room for the re-encoded prompt's drift
        tokenizer, run["parameters"] = write_random_checkpoint(ckpt, args.model, context)
        prompts = make_prompts(tokenizer, max(args.requests, 2 * max(args.clients)), args.prompt_tokens)
        run["results"] = measure(args, ckpt, prompts)
    run["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    write_text(out_dir / "results.json", json.dumps(run, indent=1))
    write_text(out_dir / "results.md", markdown(run))
    plot(run, out_dir / "latency.png")
    print(markdown(run))
    print(f"wrote {out_dir}/results.json, results.md, latency.png ({run['elapsed_s']:.0f} s)")
    return 0
