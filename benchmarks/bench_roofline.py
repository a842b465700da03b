"""Prefill and decode of SmolLM2-135M fp32 against PyTorch, llama.cpp and the machine's measured roofline.

    python benchmarks/bench_roofline.py                        # 1k/4k prompts, HF and llama.cpp at both
    python benchmarks/bench_roofline.py --lengths 1024 4096 16384 --peer-max-length 4096

One run, side by side: the machine's fp32 matmul peak (a jitted [N, N] @ [N, N], GFLOP/s) and its
memory bandwidth (a jitted sum and one large matvec, GB/s) are measured at the start and again at
the end (the best is the roofline: the load of a shared machine only lowers them); then per prompt
length, anjax prefill (batch 1, full and anchor cache) and decode (batch 1 and --batches), HF
transformers (torch CPU fp32, same weights, --hf-threads torch threads) and llama.cpp (an F32 GGUF
of the same dequantized weights, --llama-threads threads, flash attention; only when llama-cpp-python
is installed: requirements-bench.txt).

Prefill FLOPs per token: 2 x the layer weights (the LM head is not applied in prefill) plus causal
attention, 4 x layers x heads x head_dim x (n + 1) / 2 for an n-token prompt (the full-cache work;
the anchor cache does less, but is counted the same so the two columns compare). Decode bytes per
token (batch 1): every weight once (the tied LM head = the embedding table) plus the keys and
values held (the full cache: the prompt; the anchor cache: the slots it keeps). Roofline tok/s =
bandwidth / bytes per token. Timings on a shared machine are noisy: best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from common import (
    RESULTS,
    begin,
    bench_engine,
    bench_hf,
    english_tokens,
    fmt,
    hf_model,
    machine_peaks,
    pyplot,
    ratio,
    save,
)

from anjax.inference.engine import Engine, EngineConfig
from anjax.io.loading import load_model


def model_shape(cfg, params) -> dict:
    """Weight counts of the model (per token): layer matmul weights, all weights read in decode."""
    sizes = {"/".join(str(k.key) for k in path): x.size for path, x in jax.tree_util.tree_leaves_with_path(params)}
    layer = sum(s for k, s in sizes.items() if k.startswith("layers/") and "norm" not in k)
    return {"layer_weights": layer, "all_weights": sum(sizes.values())}


def prefill_flops_per_token(cfg, shape: dict, n: int) -> float:
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (n + 1) / 2
    return 2 * shape["layer_weights"] + attention


def decode_bytes_per_token(cfg, shape: dict, kv_slots: int, itemsize: int = 4) -> float:
    return itemsize * (shape["all_weights"] + 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_slots)


def f32_gguf(source: Path, dest: Path) -> Path:
    """An F32 GGUF of `source` (its metadata as is, every tensor dequantized): llama.cpp on the same fp32
    weights as anjax and transformers."""
    import gguf

    if dest.exists():
        return dest
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(str(dest), str(bytes(arch.parts[arch.data[0]]), "utf-8"))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            writer.add_uint32(field.name, int(gguf.LlamaFileType.ALL_F32))
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def bench_llama_cpp(model_path: Path, prompt: list[int], args) -> dict | None:
    """llama.cpp prefill and greedy decode tok/s (best of --repeats), or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=len(prompt) + args.new_tokens + 8,
        n_batch=512,
        n_threads=args.llama_threads,
        n_threads_batch=args.llama_threads,
        flash_attn=True,
        verbose=False,
    )
    best = {"prefill": 0.0, "decode": 0.0}
    for _ in range(args.repeats + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(args.new_tokens):  # llama-cpp-python keeps no scores without logits_all: read the last row
            last_V = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(last_V))])
        t2 = time.perf_counter()
        best = {
            "prefill": max(best["prefill"], len(prompt) / (t1 - t0)),
            "decode": max(best["decode"], args.new_tokens / (t2 - t1)),
        }
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decode batch sizes (1 first)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=EngineConfig.chunk_size)
    p.add_argument("--anchor-capacity", type=int, default=2048)
    p.add_argument(
        "--attention", default=None, help="model.attention for anjax (dense|sparse|auto; default: the model's)"
    )
    p.add_argument("--peer-max-length", type=int, default=4096, help="longest prompt for HF and llama.cpp")
    p.add_argument("--hf-threads", type=int, nargs="+", default=[2], help="torch threads (XLA uses every core)")
    p.add_argument("--llama-threads", type=int, default=2)
    p.add_argument("--max-kv-gb", type=float, default=6.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "bench_roofline"), help="path stem for .json, .md and .png")
    args = p.parse_args()
    prov = begin(__file__)

    peaks = [machine_peaks()]
    print(f"machine at start: {json.dumps(peaks[0])}", flush=True)
    cfg, params, tokenizer = load_model(None, scan_layers=True)
    if args.attention:
        cfg = cfg.replace(attention=args.attention)
    shape = model_shape(cfg, params)
    engines = {
        cache: Engine(cfg, params, tokenizer, config=EngineConfig(cache=cache, anchor_mode="ep"))
        for cache in ("full", "anchor")
    }
    text = english_tokens(tokenizer, max(args.lengths))
    peer_lengths = [n for n in args.lengths if n <= args.peer_max_length]
    hf = hf_model() if peer_lengths else None
    gguf_path = None
    if peer_lengths:
        from anjax.io.gguf_import import default_model_path

        gguf_path = f32_gguf(default_model_path(), Path(tempfile.gettempdir()) / "anjax-smollm2-135m-f32.gguf")

    rows = []
    for n in args.lengths:
        prompt = text[:n]
        res = {cache: bench_engine(eng, prompt, args.batches, args) for cache, eng in engines.items()}
        peer = bench_hf(hf, prompt, args) if n in peer_lengths else None
        lcpp = bench_llama_cpp(gguf_path, prompt, args) if n in peer_lengths else None
        row = dict(length=n, anchor_slots=res["anchor"]["held"], flops_per_token=prefill_flops_per_token(cfg, shape, n))
        for cache in ("full", "anchor"):
            row[f"prefill_{cache}"] = res[cache]["prefill"]
            slots = n + args.new_tokens // 2 if cache == "full" else res["anchor"]["held"]
            row[f"decode_bytes_{cache}"] = decode_bytes_per_token(cfg, shape, slots)
            for b in args.batches:
                row[f"decode_{cache}_b{b}"] = res[cache][b] and res[cache][b]["decode"]
        row.update(
            prefill_hf=peer and peer["prefill"],
            decode_hf=peer and peer["decode"],
            prefill_llama_cpp=lcpp and lcpp["prefill"],
            decode_llama_cpp=lcpp and lcpp["decode"],
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        partial = Path(args.out).with_suffix(".partial.json")  # each length as it finishes (a time limit keeps it)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"args": vars(args), "peaks": peaks, "rows": rows}, indent=1))

    peaks.append(machine_peaks())
    print(f"machine at end: {json.dumps(peaks[1])}", flush=True)
    peak = {k: max(x[k] for x in peaks) for k in peaks[0]}
    bandwidth = max(peak["sum_gbs"], peak["matvec_gbs"])
    for r in rows:
        for cache in ("full", "anchor"):
            r[f"prefill_{cache}_peak_frac"] = (
                r[f"prefill_{cache}"] * r["flops_per_token"] / (peak["matmul_gflops"] * 1e9)
            )
            r[f"roofline_{cache}"] = bandwidth * 1e9 / r[f"decode_bytes_{cache}"]
    table = report(rows, peak, peaks, cfg, args)
    print(table)
    meta = {"args": vars(args), "platform": jax.devices()[0].platform, "attention": cfg.attention, "shape": shape}
    save(args.out, {**meta, "peaks": peaks, "peak": peak, "rows": rows}, prov, markdown=table, plot=plot)
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)


def report(rows, peak, peaks, cfg, args) -> str:
    lines = [
        f"SmolLM2-135M fp32, {jax.devices()[0].platform}, attention={cfg.attention}, chunk {args.chunk_size}, "
        f"{args.new_tokens} new tokens. Machine (start / end): matmul "
        f"{peaks[0]['matmul_gflops']:.0f} / {peaks[1]['matmul_gflops']:.0f} GFLOP/s, bandwidth (sum, matvec) "
        f"{peaks[0]['sum_gbs']:.1f}, {peaks[0]['matvec_gbs']:.1f} / {peaks[1]['sum_gbs']:.1f}, "
        f"{peaks[1]['matvec_gbs']:.1f} GB/s",
        "",
        "**Prefill, batch 1** (tok/s; % of the matmul peak; x = anjax / peer)",
        "",
        "| prompt | anjax full | anjax anchor | HF | llama.cpp | full / HF | anchor / HF | full / llama.cpp | "
        "full % peak | anchor % peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {fmt(r['prefill_full'])} | {fmt(r['prefill_anchor'])} | {fmt(r['prefill_hf'])} | "
            f"{fmt(r['prefill_llama_cpp'])} | {fmt(ratio(r['prefill_full'], r['prefill_hf']), '.2f')} | "
            f"{fmt(ratio(r['prefill_anchor'], r['prefill_hf']), '.2f')} | "
            f"{fmt(ratio(r['prefill_full'], r['prefill_llama_cpp']), '.2f')} | "
            f"{100 * r['prefill_full_peak_frac']:.0f}% | {100 * r['prefill_anchor_peak_frac']:.0f}% |"
        )
    b16 = [b for b in args.batches if b != 1]
    lines += [
        "",
        "**Decode** (tok/s; roofline = bandwidth / bytes per token at batch 1)",
        "",
        "| prompt | full b1 | anchor b1 | HF b1 | llama.cpp b1 | roofline full | full % roof | anchor % roof | "
        "full / llama.cpp | anchor / llama.cpp |" + "".join(f" full b{b} | anchor b{b} |" for b in b16),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(b16),
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {fmt(r['decode_full_b1'])} | {fmt(r['decode_anchor_b1'])} | {fmt(r['decode_hf'])} | "
            f"{fmt(r['decode_llama_cpp'])} | {fmt(r['roofline_full'])} | "
            f"{100 * (r['decode_full_b1'] or 0) / r['roofline_full']:.0f}% | "
            f"{100 * (r['decode_anchor_b1'] or 0) / r['roofline_anchor']:.0f}% | "
            f"{fmt(ratio(r['decode_full_b1'], r['decode_llama_cpp']), '.2f')} | "
            f"{fmt(ratio(r['decode_anchor_b1'], r['decode_llama_cpp']), '.2f')} |"
            + "".join(f" {fmt(r[f'decode_full_b{b}'])} | {fmt(r[f'decode_anchor_b{b}'])} |" for b in b16)
        )
    return "\n".join(lines)


def plot(data: dict, file) -> None:
    rows = data["rows"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    lengths = [r["length"] for r in rows]
    for ax, kind, peers in (
        (ax1, "prefill", ("full", "anchor", "hf", "llama_cpp")),
        (ax2, "decode", ("full_b1", "anchor_b1", "hf", "llama_cpp")),
    ):
        for i, name in enumerate(peers):
            pts = [(n, r[f"{kind}_{name}"]) for n, r in zip(lengths, rows) if r[f"{kind}_{name}"]]
            if pts:
                ax.plot(*zip(*pts), "-o", color=f"C{i}", label=name.replace("_b1", "").replace("_", "."))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("tokens/s")
    ax2.plot(lengths, [r["roofline_full"] for r in rows], "k--", label="roofline (full)")
    ax1.set_title("prefill, batch 1")
    ax2.set_title("decode, batch 1")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M fp32 on CPU: anjax vs transformers vs llama.cpp, one run")
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


if __name__ == "__main__":
    main()
