"""The engine's decode loop with scanned vs split layers (`EngineConfig.decode_layers`), side by side in one run.

    python -m benchmarks.investigations.cpu_decode.bench_decode_layers   # 1k prompt, batch 1 and 16, both caches

SmolLM2-135M fp32, one prompt of real English text (`benchmarks.common.english_tokens`), prefilled once per cache;
then decode at batch B from B copies of that row, alternating the two layouts --repeats times (the best of each
is kept): "scan" runs the stacked layers in `lax.scan`, "split" unrolled layers on per-layer weights (held so by
the engine, q/k/v and gate/up fused) and cache buffers. Both generate the same ids (checked here too). -> OUT.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from anjax.inference.engine import Engine, EngineConfig
from anjax.io import outputs
from anjax.io.loading import load_model
from benchmarks.common import english_tokens, tile

HERE = Path(__file__).resolve().parent  # this investigation's result files
LAYOUTS = ("scan", "split")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024, help="prompt tokens")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "bench_decode_layers"), help="path stem for .json and .md")
    args = p.parse_args()
    if args.length < 2 or min(args.batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
        p.error("need --length >= 2, --batches >= 1, --new-tokens >= 1 and --repeats >= 1")

    cfg, params, tokenizer = load_model(None, scan_layers=True)
    rows = []
    for cache in ("full", "anchor"):
        engines = {
            layout: Engine(
                cfg, params, tokenizer, config=EngineConfig(cache=cache, anchor_mode="ep", decode_layers=layout)
            )
            for layout in LAYOUTS
        }
        prompt = english_tokens(tokenizer, args.length)[: args.length]
        capacity = args.length + args.new_tokens
        pre = engines["scan"].prefill([prompt], 1, 256, capacity)
        for B in args.batches:
            best, ids = dict.fromkeys(LAYOUTS, 0.0), {}
            for _ in range(args.repeats + 1):  # the first round compiles
                for layout, eng in engines.items():
                    g = eng.decode(tile(pre, B), args.new_tokens)
                    best[layout] = max(
                        best[layout], sum(x.stats["generated_tokens"] for x in g) / g[0].stats["decode_s"]
                    )
                    ids[layout] = [x.ids for x in g]
            if ids["scan"] != ids["split"]:
                raise SystemExit(f"{cache} cache, batch {B}: the layouts generated different ids")
            rows.append(dict(cache=cache, batch=B, **{f"{k}_tok_s": v for k, v in best.items()}))
            print(json.dumps(rows[-1]), flush=True)
    md = markdown(rows, args)
    print("\n" + md)
    out = Path(args.out)
    outputs.write_report(out.parent, out.name, md, {"args": vars(args), "rows": rows})
    print(f"saved {out.with_suffix('.json')} and .md")


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"SmolLM2-135M fp32 decode, {jax.default_backend()}, {args.length}-token prompt, {args.new_tokens} new tokens, "
        f"best of {args.repeats} alternating rounds; tok/s",
        "",
        "| cache | batch | scan | split | split / scan |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['batch']} | {r['scan_tok_s']:.1f} | {r['split_tok_s']:.1f} | "
            f"{r['split_tok_s'] / r['scan_tok_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
