"""Anchor vs full KV cache (and HF transformers) on SmolLM2-135M fp32: prefill, decode, KV bytes.

    python benchmarks/bench_decode.py                       # 1k/4k/16k prompts, batch 1/8/16
    python benchmarks/bench_decode.py --quick               # 1k/4k, batch 1/16, 16 new tokens

Prompts are real English (CPython's pydoc_data.topics), one window of the text per row.
Anchors: AnLLM-EP (. ? !). SmolLM2 was not trained with anchors, so the anchor run's text is not
meaningful; its speed and memory are (the computation is the same for a trained AnLLM).
Prefill is measured at batch 1 for each prompt length; decode at batch B starts from B copies
of that row's prefilled state (rows are independent, so the work per row is the same as for B
different prompts). KV bytes: the decode buffer (keys + values, all layers and rows); the
anchor prefill buffer is capacity + chunk slots per row whatever the prompt length.
HF transformers (torch CPU, same GGUF weights, greedy): batch 1, prompts up to --hf-max-length,
the best over torch thread counts --hf-threads; decode tok/s = new tokens / (time(1 + new
tokens) - time(1 token)).
Configurations whose full-cache KV would exceed --max-kv-gb are skipped. Timings on a shared
machine are noisy: each number is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json

import jax
from common import RESULTS, begin, bench_engine, bench_hf, english_tokens, fmt, hf_model, pyplot, ratio, save

from anjax.inference.engine import Engine, EngineConfig
from anjax.io.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=EngineConfig.chunk_size)
    p.add_argument("--anchor-capacity", type=int, default=2048, help="slots an anchor-cache row may keep")
    p.add_argument("--hf-max-length", type=int, default=4096, help="longest prompt for the HF column (0: none)")
    p.add_argument(
        "--hf-threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch thread counts to try (best kept: 2 OpenMP threads suffer on a busy 2-core machine)",
    )
    p.add_argument("--max-kv-gb", type=float, default=6.0, help="skip full-cache runs whose KV exceeds this")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1k/4k prompts, batch 1/16, 16 new tokens, 1 repeat")
    p.add_argument("--out", default=str(RESULTS / "bench_decode"), help="path stem for .json and .png")
    args = p.parse_args()
    prov = begin(__file__)
    if args.quick:
        args.lengths, args.batches, args.new_tokens, args.repeats = [1024, 4096], [1, 16], 16, 1

    cfg, params, tokenizer = load_model(None, scan_layers=True)
    engines = {
        "anchor": Engine(cfg, params, tokenizer, config=EngineConfig(cache="anchor", anchor_mode="ep")),
        "full": Engine(cfg, params, tokenizer, config=EngineConfig(cache="full")),
    }
    text = english_tokens(tokenizer, max(args.lengths))
    hf_lengths = [n for n in args.lengths if n <= args.hf_max_length]
    peer = hf_model() if hf_lengths else None
    rows = []
    for length in args.lengths:
        prompt = text[:length]
        res = {kind: bench_engine(eng, prompt, args.batches, args) for kind, eng in engines.items()}
        hf = bench_hf(peer, prompt, args) if length in hf_lengths else None
        for b in args.batches:
            a, f = res["anchor"][b], res["full"][b]
            rows.append(
                dict(
                    length=length,
                    batch=b,
                    anchor_slots=res["anchor"]["held"],
                    prefill_anchor=res["anchor"]["prefill"] if b == 1 else None,
                    prefill_full=res["full"]["prefill"] if b == 1 else None,
                    prefill_hf=hf["prefill"] if hf and b == 1 else None,
                    decode_anchor=a and a["decode"],
                    decode_full=f and f["decode"],
                    decode_hf=hf["decode"] if hf and b == 1 else None,
                    kv_mb_anchor=a and a["kv_mb"],
                    kv_mb_full=f and f["kv_mb"],
                )
            )
            print(json.dumps(rows[-1]), flush=True)

    header = (
        "prompt batch | prefill tok/s anchor  full    HF | decode tok/s anchor   full     HF | "
        "anchor/full  full/HF | KV MB anchor    full | anchor slots"
    )
    print(
        f"\nSmolLM2-135M fp32, {jax.devices()[0].platform}, {args.new_tokens} new tokens, chunk {args.chunk_size}, "
        f"anchor capacity {args.anchor_capacity}\n{header}"
    )
    for r in rows:
        speed, vs_hf = ratio(r["decode_anchor"], r["decode_full"]), ratio(r["decode_full"], r["decode_hf"])
        print(
            f"{r['length']:>6} {r['batch']:>5} | {fmt(r['prefill_anchor']):>20} {fmt(r['prefill_full']):>5} "
            f"{fmt(r['prefill_hf']):>5} | {fmt(r['decode_anchor']):>19} {fmt(r['decode_full']):>6} "
            f"{fmt(r['decode_hf']):>6} | {fmt(speed, '.2f'):>11} {fmt(vs_hf, '.2f'):>8} | "
            f"{fmt(r['kv_mb_anchor']):>12} {fmt(r['kv_mb_full']):>7} | {r['anchor_slots']:>12}"
        )
    save(args.out, {"args": vars(args), "rows": rows}, prov, plot=plot)


def plot(data: dict, file) -> None:
    rows = data["rows"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    for i, b in enumerate(data["args"]["batches"]):
        sel = [r for r in rows if r["batch"] == b]
        color = f"C{i}"
        for key, style, label in (
            ("decode_anchor", "-o", "anchor"),
            ("decode_full", "--s", "full"),
            ("decode_hf", ":^", "HF transformers"),
        ):
            pts = [(r["length"], r[key]) for r in sel if r[key]]
            if pts:
                ax1.plot(*zip(*pts), style, color=color, label=f"{label}, batch {b}")
        for key, style in (("kv_mb_anchor", "-o"), ("kv_mb_full", "--s")):
            pts = [(r["length"], r[key]) for r in sel if r[key]]
            if pts:
                ax2.plot(*zip(*pts), style, color=color, label=f"{key[6:]}, batch {b}")
    for ax, title in ((ax1, "decode tokens/s"), (ax2, "KV cache MB (decode buffer)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M fp32 on CPU: anchor vs full KV cache")
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


if __name__ == "__main__":
    main()
