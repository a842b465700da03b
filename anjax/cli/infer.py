"""Batched generation with an anchor, a full or a training-free policy's KV cache (anjax.inference.engine.Engine).

    python infer.py --prompt "The cat sat on the mat." --max-new-tokens 32 [--json]
    python infer.py --input prompts.jsonl --output out.jsonl --cache anchor --anchor-mode ep
    python infer.py --prompt "..." --cache h2o --budget 0.2     # or window / snapkv; --budget 256 slots

--model defaults to the embedded SmolLM2-135M-Instruct. Greedy unless --temperature > 0.
Input lines are JSON objects {"prompt": TEXT, "id": optional, "protect": optional list of
parts of the prompt kept visible to every later token}; output lines are
{"id", "prompt", "text", "ids", "stats"}, or {"id", "line", "error"} for a request that
failed (it is reported on stderr; the other lines are still served). The output file
is written atomically. Exit codes: 0 all served, 1 some requests failed, 2 invalid run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from anjax import cli
from anjax.io import outputs


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python infer.py", description=cli.summary(__doc__))
    cli.add_engine_args(p)
    p.add_argument("--prompt", help="one prompt text")
    p.add_argument("--input", help='JSONL file of {"prompt": ..., "id": ...} objects')
    p.add_argument("--output", help="JSONL results (with --input)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print {prompt_ids, generated_ids, text, stats} (--prompt)")
    p.add_argument(
        "--cache",
        default=None,
        help="anchor: keep anchors + open sentence; full: plain causal attention "
        "(default: anchor if the model has anchor settings); or a training-free policy with --budget: "
        "window (sink + recent), snapkv, h2o",
    )
    p.add_argument(
        "--budget",
        type=budget,
        default=None,
        help="a policy's slots per row: N (an integer) or a fraction of each prompt in (0, 1], e.g. 0.2",
    )
    cli.add_policy_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (tokens per row; default: the engine's)")
    p.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="cache slots a row may keep (default: the whole request, at most 2048 with an anchor cache)",
    )
    p.add_argument(
        "--positions",
        choices=("true", "reference"),
        default="true",
        help="reference: the AnLLM authors' re-based positions (inexact, for comparison)",
    )
    p.add_argument("--sink-tokens", type=int, default=0, help="keep the first N tokens visible (extension, off)")
    p.add_argument(
        "--protect",
        action="append",
        default=[],
        metavar="TEXT",
        help="with --prompt: keep this part of the prompt visible to every later token and in the "
        "cache (repeatable; extension)",
    )
    p.add_argument(
        "--max-sentence-tokens", type=int, default=None, help="AC mode: force <AC> after N tokens without one"
    )
    p.add_argument("--raw-prompt", action="store_true", help="tokenize prompts as they are (no <AC> inserted)")
    p.add_argument("--show-anchors", action="store_true", help="keep generated <AC> tokens in the printed text")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if (args.prompt is None) == (args.input is None):
        raise cli.UsageError("give either --prompt TEXT or --input prompts.jsonl --output out.jsonl")
    if args.input is not None and not args.output:
        raise cli.UsageError("--input needs --output out.jsonl")
    for name, low in (
        ("max_new_tokens", 1),
        ("top_k", 0),
        ("batch_size", 1),
        ("chunk_size", 1),
        ("capacity", 1),
        ("sink_tokens", 0),
        ("max_sentence_tokens", 1),
        ("temperature", 0),
    ):
        cli.check_range(f"--{name.replace('_', '-')}", getattr(args, name), low)
    cli.check_range("--top-p", args.top_p, 0, 1, low_open=True)
    cli.check_seed("--seed", args.seed)
    if args.prompt is not None and not args.prompt.strip():
        raise cli.UsageError("--prompt is empty")
    if args.protect and args.prompt is None:
        raise cli.UsageError('--protect goes with --prompt; in a JSONL file give "protect": [...] per line')
    if bad := [t for t in args.protect if t not in (args.prompt or "") or not t]:
        raise cli.UsageError(f"--protect text {bad[0]!r} does not occur in the prompt")
    if args.input is not None:
        cli.check_readable_file(args.input, "--input")
        cli.check_writable_file(args.output, "--output", [("--input", args.input)])
    return args


def budget(text: str) -> int | float:
    """--budget: slots (an integer) or a fraction (with a point); the engine checks the range."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected slots (an integer) or a fraction in (0, 1], got {text!r}") from None


def check_sizes(engine, args) -> None:
    """Refuse --max-new-tokens that no prompt could fit in the model's positions (or a full cache's capacity)."""
    positions = engine.cfg.max_position_embeddings
    if args.max_new_tokens >= positions:
        raise cli.UsageError(
            f"--max-new-tokens {args.max_new_tokens} cannot fit: the model has {positions} positions "
            "for the prompt and the new tokens together"
        )
    if engine.cache_kind == "full" and args.capacity is not None and args.max_new_tokens >= args.capacity:
        raise cli.UsageError(
            f"--max-new-tokens {args.max_new_tokens} cannot fit in a full cache of --capacity "
            f"{args.capacity} slots (prompt + new tokens)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from anjax.core import sharding
    from anjax.inference.engine import Engine, EngineConfig
    from anjax.inference.requests import read_requests

    sharding.init_distributed()  # a multi-process run: every process generates, process 0 writes --output

    config = EngineConfig.from_args(args)
    t0 = time.perf_counter()
    engine = Engine.load(args.model, config, args.dtype, args.mesh)
    load_s = time.perf_counter() - t0
    check_sizes(engine, args)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_sentence_tokens=args.max_sentence_tokens,
    )
    if args.prompt is not None:
        out = engine.generate([args.prompt], **sampling, protect=[args.protect])[0]
        stats = dict(out.stats, load_s=round(load_s, 2), compile_s=round(engine.compile_seconds, 2))
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_ids": out.prompt_ids,
                        "generated_ids": out.ids[len(out.prompt_ids) :],
                        "text": out.text,
                        "stats": stats,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(out.text)
            print(
                f"[{stats['generated_tokens']} tokens, decode {stats['decode_tokens_per_s']} tok/s, "
                f"cache {stats['peak_cache_slots']}/{stats['full_cache_slots']} slots ({engine.cache_kind})]",
                file=sys.stderr,
            )
        return 0

    from tqdm import tqdm

    requests, errors = read_requests(args.input)
    if not requests and not errors:
        raise cli.UsageError(f"{args.input}: no requests")
    records = {}
    with tqdm(total=len(requests), unit="prompt", file=sys.stderr) as bar:

        def advance(n: int) -> None:
            bar.update(n)

        results = (
            engine.generate(
                [r[2] for r in requests],
                **sampling,
                protect=[r[3] for r in requests],
                raise_errors=False,
                progress=advance,
            )
            if requests
            else []
        )
    for (line, rid, prompt, _), g in zip(requests, results):
        if g.error:
            errors.append({"id": rid, "line": line, "error": g.error})
        else:
            records[line] = {"id": rid, "prompt": prompt, "text": g.text, "ids": g.ids, "stats": g.stats}
    for e in errors:
        records[e["line"]] = e
        print(f"{args.input}:{e['line']}: {e['error']}", file=sys.stderr)
    if jax.process_index() == 0:
        outputs.write_jsonl(args.output, [records[n] for n in sorted(records)])
    served = len(records) - len(errors)
    print(f"wrote {served} results and {len(errors)} errors to {args.output}", file=sys.stderr)
    return 1 if errors else 0
