"""Generation with the training-free cache policies beside the anchor and full caches: decode speed and KV.

    python benchmarks/bench_policy_decode.py                        # 1k/4k prompts, batch 1/16, budget 0.1
    python benchmarks/bench_policy_decode.py --lengths 1024 --budget 0.05

SmolLM2-135M fp32, the same real English prompts and the same engine for every cache (`bench_decode`'s
measurement: prefill at batch 1, decode at batch B from B copies of the prefilled row, best of --repeats).
The policies (`EngineConfig(cache=POLICY, budget=...)`) prefill with the full cache, keep --budget of the
prompt per layer and KV head, and then `window` and `h2o` evict after every generated token (h2o reranks
its slots each step), while `snapkv` appends. The anchor cache uses EP anchors (SmolLM2 was not trained
with them: its speed and memory are meaningful, its text is not). Held: the slots a row keeps when
decoding starts; KV MB: the decode buffer at the largest batch. -> OUT.{json,md,png}
"""

from __future__ import annotations

import argparse
import json

import jax
from common import RESULTS, begin, bench_engine, english_tokens, fmt, pyplot, save

from anjax.inference.engine import Engine, EngineConfig
from anjax.inference.policies import POLICIES, fraction_slots
from anjax.io.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--budget", type=float, default=0.1, help="the policies' fraction of each prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=EngineConfig.chunk_size)
    p.add_argument("--anchor-capacity", type=int, default=2048)
    p.add_argument("--max-kv-gb", type=float, default=6.0, help="skip runs whose decode KV exceeds this")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "bench_policy_decode"), help="path stem for .json, .md, .png")
    args = p.parse_args()
    prov = begin(__file__)
    if not 0 < args.budget <= 1:
        p.error(f"--budget must be a fraction in (0, 1], got {args.budget}")

    cfg, params, tokenizer = load_model(None, scan_layers=True)
    configs = {
        "full": EngineConfig(cache="full"),
        "anchor": EngineConfig(cache="anchor", anchor_mode="ep"),
        **{kind: EngineConfig(cache=kind, budget=args.budget) for kind in POLICIES},
    }
    text = english_tokens(tokenizer, max(args.lengths))
    rows = []
    for length in args.lengths:
        for name, config in configs.items():
            res = bench_engine(Engine(cfg, params, tokenizer, config), text[:length], args.batches, args)
            rows.append(
                dict(
                    length=length,
                    cache=name,
                    held=res["held"] if name in ("full", "anchor") else fraction_slots(args.budget, length - 1),
                    prefill=res["prefill"],
                    **{f"decode_b{b}": res[b] and res[b]["decode"] for b in args.batches},
                    kv_mb=res[args.batches[-1]] and res[args.batches[-1]]["kv_mb"],
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    md = markdown(rows, args)
    print("\n" + md)
    save(args.out, {"args": vars(args), "rows": rows}, prov, markdown=md, plot=plot)


def markdown(rows: list[dict], args) -> str:
    b_last = args.batches[-1]
    head = ["prompt", "cache", "held slots", "prefill tok/s"] + [f"decode b{b}" for b in args.batches]
    head += [f"b{b_last} vs full", f"KV MB b{b_last}"]
    lines = [
        f"SmolLM2-135M fp32, {jax.devices()[0].platform}, {args.new_tokens} new tokens, policies at budget "
        f"{args.budget:g} of the prompt (tok/s; x = decode at batch {b_last} / the full cache's)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    full = {r["length"]: r for r in rows if r["cache"] == "full"}
    for r in rows:
        f = full[r["length"]][f"decode_b{b_last}"]
        x = r[f"decode_b{b_last}"] / f if r[f"decode_b{b_last}"] and f else None
        cells = [r["length"], r["cache"], r["held"], fmt(r["prefill"])] + [fmt(r[f"decode_b{b}"]) for b in args.batches]
        lines.append("| " + " | ".join(map(str, cells + [fmt(x, ".2f"), fmt(r["kv_mb"])])) + " |")
    return "\n".join(lines)


def plot(data: dict, file) -> None:
    rows, batches, budget = data["rows"], data["args"]["batches"], data["args"]["budget"]
    caches = list(dict.fromkeys(r["cache"] for r in rows))
    fig, axes = pyplot().subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, cache in enumerate(caches):
            pts = [(r["length"], r[f"decode_b{b}"]) for r in rows if r["cache"] == cache and r[f"decode_b{b}"]]
            if pts:
                ax.plot(*zip(*pts), "-o", color=f"C{i}", label=cache)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(f"decode tokens/s, batch {b}")
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M fp32 on CPU: cache policies at budget {budget:g} vs anchor and full")
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


if __name__ == "__main__":
    main()
