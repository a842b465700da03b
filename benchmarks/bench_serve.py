"""Load test of the OpenAI-compatible server (`python -m anjax.serve`): anchor vs full cache at one KV memory budget.

    python benchmarks/bench_serve.py                                    # 64 requests, concurrency 1/4/16
    python benchmarks/bench_serve.py --requests 16 --prompt-tokens 512 --new-tokens 16   # reduced
    python benchmarks/bench_serve.py --transcript-only                  # the openai-client transcript alone

For each cache a server runs in a subprocess on 127.0.0.1 with the same KV budget: the full cache gets
--full-slots slots of prompt + new tokens each; the anchor cache (AnLLM-EP anchors . ? !) gets slots of
--anchor-capacity each, as many as the same number of KV slots holds. Requests are streamed with the
official `openai` client from --concurrency worker threads (greedy, max_tokens = --new-tokens); prompts
are windows of --prompt-tokens tokens of real text (data/corpus validation documents, cut at a token).
Measured per request: time to first token (TTFT) and per-token latency after it (TPOT); per run:
requests/s and output tokens/s over the wall time. The first request of each server (compilation)
is excluded. SmolLM2 was not trained with anchors, so the anchor server's text is not meaningful;
its speed and memory are. Writes benchmarks/results/bench_serve.{json,png} and, first, the transcript
of the openai client talking to the full-cache server (benchmarks/results/serve_transcript.txt).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
from common import RESULTS, begin, pyplot, save

from anjax.io.loading import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--full-slots", type=int, default=4, help="the full cache's slots: sets the KV budget")
    p.add_argument("--anchor-capacity", type=int, default=256, help="KV slots per anchor-cache slot")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--caches", nargs="+", default=["full", "anchor"], choices=("anchor", "full"))
    p.add_argument("--out", default="bench_serve", help="results name under benchmarks/results/")
    p.add_argument("--transcript-only", action="store_true")
    return p.parse_args(argv)


def prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """n texts of about `tokens` tokens: validation documents of data/corpus (joined, cut at a token)."""
    import datasets

    docs = datasets.load_from_disk(str(ROOT / "data" / "corpus"))["validation"]["text"]
    ids = tokenizer.encode("\n\n".join(docs), add_special_tokens=False)
    step = max(1, (len(ids) - tokens) // n)
    return [tokenizer.decode(ids[i * step : i * step + tokens]) for i in range(n)]


class Server:
    """`python -m anjax.serve ...` on a free port of 127.0.0.1, until `close()` (SIGTERM)."""

    def __init__(self, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "anjax.serve", "--port", str(self.port), *map(str, args)]
        self.log = tempfile.TemporaryFile("w+")  # the server's stderr (a pipe could fill up and block it)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError(f"the server did not start: {self.log.read()}") from None
                time.sleep(0.5)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=1800)

    def metrics(self) -> str:
        return urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()

    def close(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def one(client, prompt: str, new_tokens: int) -> dict:
    """Stream one completion: TTFT, per-token latency, tokens."""
    t0 = time.perf_counter()
    times, n = [], 0
    stream = client.completions.create(
        model="m",
        prompt=prompt,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].model_extra.get("token_ids"):
            times.append(time.perf_counter())
        if chunk.usage:
            n = chunk.usage.completion_tokens
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "tokens": n}


def load(server: Server, texts: list[str], concurrency: int, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda p: one(server.client, p, new_tokens), texts))
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    pct = lambda key, q: round(float(np.nanpercentile([r[key] for r in runs], q)), 4)
    tokens = sum(r["tokens"] for r in runs)
    return {
        "concurrency": concurrency,
        "requests": len(runs),
        "errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(runs) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "output_tokens": tokens,
        "ttft_p50_s": pct("ttft", 50),
        "ttft_p95_s": pct("ttft", 95),
        "tpot_p50_s": pct("tpot", 50),
        "tpot_p95_s": pct("tpot", 95),
    }


def transcript(server: Server, path: Path) -> None:
    """The openai client talking to the server, written to `path`."""
    c, lines = server.client, []
    say = lambda *parts: lines.append(" ".join(str(p) for p in parts))
    say(f"# openai=={openai.__version__} talking to `python -m anjax.serve` at {server.url}/v1")
    say(">>> client.models.list()")
    say([m.model_dump() for m in c.models.list()])
    say('>>> client.completions.create(prompt="The capital of France is", max_tokens=12, temperature=0)')
    say(
        c.completions.create(
            model="m", prompt="The capital of France is", max_tokens=12, temperature=0
        ).model_dump_json()
    )
    messages = [{"role": "user", "content": "Name three colors."}]
    say(f">>> client.chat.completions.create(messages={messages}, max_tokens=24, temperature=0.7, seed=1)")
    say(
        c.chat.completions.create(
            model="m", messages=messages, max_tokens=24, temperature=0.7, seed=1
        ).model_dump_json()
    )
    say(f">>> client.chat.completions.create(messages={messages}, max_tokens=24, temperature=0, stream=True)")
    for chunk in c.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0, stream=True):
        say(chunk.model_dump_json())
    say('>>> client.completions.create(prompt="One, two, three,", max_tokens=20, temperature=0, stop=[" five"])')
    say(
        c.completions.create(
            model="m", prompt="One, two, three,", max_tokens=20, temperature=0, stop=[" five"]
        ).model_dump_json()
    )
    say('>>> client.completions.create(prompt="Hi", max_tokens=10**6)')
    try:
        c.completions.create(model="m", prompt="Hi", max_tokens=10**6)
    except openai.BadRequestError as e:
        say(f"openai.BadRequestError {e.status_code}:", json.dumps(e.body))
    say(">>> GET /metrics")
    say("\n".join(line for line in server.metrics().splitlines() if line.startswith("anjax_")))
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def plot(results: dict, file) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 4))
    for cache, run in results["runs"].items():
        label = f"{cache} ({run['slots']} slots x {run['capacity']})"
        conc = [r["concurrency"] for r in run["loads"]]
        axes[0].plot(conc, [r["output_tokens_per_s"] for r in run["loads"]], "o-", label=label)
        axes[1].plot(conc, [r["ttft_p50_s"] for r in run["loads"]], "o-", label=label)
        axes[2].plot(conc, [r["tpot_p50_s"] for r in run["loads"]], "o-", label=label)
    for ax, title in zip(axes, ("output tokens/s", "p50 time to first token (s)", "p50 per-token latency (s)")):
        ax.set(xscale="log", xlabel="concurrent requests", title=title)
        ax.set_xticks(results["args"]["concurrency"], labels=[str(c) for c in results["args"]["concurrency"]])
        ax.legend(fontsize=8)
    fig.suptitle(f"anjax.serve, equal KV budget ({results['kv_budget_slots']} slots), {results['model']}")
    fig.tight_layout()
    fig.savefig(file, dpi=100, format="png")


def main(argv=None) -> int:
    args = parse_args(argv)
    prov = begin(__file__, argv)
    model = args.model
    tokenizer = load_tokenizer(model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = ["--anchor-mode", "ep", "--chunk-size", args.chunk_size, "--max-queue", max(args.concurrency) + 1]
    base += ["--model", model] if model else []
    full_capacity = args.prompt_tokens + args.new_tokens + 16  # + BOS and re-tokenization slack
    budget = args.full_slots * (full_capacity + 1)  # decode buffers hold capacity + 1 slots per row
    anchor_slots = budget // (args.anchor_capacity + 1)
    sizes = {"full": (args.full_slots, full_capacity), "anchor": (anchor_slots, args.anchor_capacity)}
    results = {
        "model": model or "SmolLM2-135M-Instruct (embedded)",
        "args": vars(args),
        "kv_budget_slots": budget,
        "runs": {},
        "machine": f"{os.cpu_count()} CPUs, jax CPU",
    }
    texts = prompts(tokenizer, args.requests + 1, args.prompt_tokens)
    for cache in args.caches:
        slots, capacity = sizes[cache]
        server = Server(*base, "--cache", cache, "--slots", slots, "--capacity", capacity)
        try:
            if cache == "full":  # SmolLM2 was not trained with anchors: its text is readable with the full cache
                transcript(server, RESULTS / "serve_transcript.txt")
                if args.transcript_only:
                    return server.close()
            t0 = time.perf_counter()
            one(server.client, texts[-1], args.new_tokens)  # compiles
            warm = time.perf_counter() - t0
            loads = []
            for c in args.concurrency:
                loads.append(load(server, texts[: args.requests], c, args.new_tokens))
                print(cache, json.dumps(loads[-1]), file=sys.stderr, flush=True)
            held = [line for line in server.metrics().splitlines() if line.startswith("anjax_requests_total")]
        finally:
            code = server.close()
        results["runs"][cache] = {
            "slots": slots,
            "capacity": capacity,
            "kv_slots": slots * (capacity + 1),
            "first_request_s": round(warm, 2),
            "loads": loads,
            "requests_total": held,
            "exit_code": code,
        }
    print(f"\nKV budget {budget} slots per server; {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
    print("| cache | slots x capacity | concurrency | req/s | output tok/s | TTFT p50 / p95 (s) | TPOT p50 / p95 (s) |")
    print("|---|---|---|---|---|---|---|")
    for cache, run in results["runs"].items():
        for r in run["loads"]:
            print(
                f"| {cache} | {run['slots']} x {run['capacity']} | {r['concurrency']} | {r['requests_per_s']} | "
                f"{r['output_tokens_per_s']} | {r['ttft_p50_s']} / {r['ttft_p95_s']} | "
                f"{r['tpot_p50_s']} / {r['tpot_p95_s']} |"
            )
    save(RESULTS / args.out, results, prov, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
