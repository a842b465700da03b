"""Where the decode step's time goes: the engine's compiled decode loop under the JAX profiler, per op kind.

    python -m benchmarks.investigations.cpu_decode.profile_decode   # 1k prompt, full and anchor cache, batch 1 and 16

SmolLM2-135M fp32, the engine's default decode (`EngineConfig.decode_layers="auto"`), one prompt of real English
(`benchmarks.common.english_tokens`) prefilled once per cache, B copies of it decoded for --new-tokens. The loop runs
once to compile, then once under `jax.profiler.trace`: XLA:CPU records each executed op (thunk) with its HLO name,
and the optimized HLO of the executable says what the op is. Every op of the loop body goes to one kind:

- layer matvecs: a dot (or a fusion holding one) reading a layer's weights (q, k, v, o, gate, up, down);
- LM head: the dot with the tied embedding table [V, E];
- attention dots: q.k and p.v, the dots with an operand on the decode buffer's slot axis;
- slot-axis ops: the other ops on that axis (mask, softmax, the cache writes, compaction);
- other ops: norms, RoPE, sampling (elementwise fusions, reductions, copies);
- between ops: the loop's wall time less the ops' own (the runtime's dispatch and waits; 0 where ops ran
  at the same time on several threads, as batch-16 products do: the shares are then of the ops' summed time);
- per call: ops outside the loop (the cache split into per-layer buffers and stacked again), per generated token.

Per kind: ms per step, share, bytes read per step (weights: every one once; attention: keys and values held) and
the GB/s that makes, against the machine's bandwidth measured in the same run (`benchmarks.common.machine_peaks`).
-> OUT.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.profiler import ProfileData

from anjax.inference.engine import Engine, EngineConfig
from anjax.inference.steps import decode_loop
from anjax.io import outputs
from anjax.io.loading import load_model
from benchmarks.common import english_tokens, machine_peaks, tile

HERE = Path(__file__).resolve().parent  # this investigation's result files
KINDS = ("layer matvecs", "LM head", "attention dots", "slot-axis ops", "other ops", "between ops", "per call")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_CALLED = re.compile(
    r"(?:calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
    r"\{?(%?[\w.\-]+(?:, %?[\w.\-]+)*)"
)


def parse_hlo(text: str) -> tuple[dict, set]:
    """({op name: (opcode, holds a dot, [operand dims...])}, the names of the ops in the outermost while loop's
    body and the computations it calls)."""
    ops, computation_of, shapes, entry, body = {}, {}, {}, None, None
    calls, opcodes = collections.defaultdict(set), collections.defaultdict(set)
    current = None
    for line in text.splitlines():
        if line.endswith("{") and " = " not in line:  # a computation's header
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            entry = current if line.startswith("ENTRY") else entry
            continue
        if not (m := _INSTRUCTION.match(line)):
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = [int(d) for d in re.findall(r"\[([\d,]*)\]", shape)[0].split(",") if d] if "[" in shape else []
        operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
        ops[name] = (opcode, operands, re.search(r"calls=%?([\w.\-]+)", rest))
        computation_of[name] = current
        opcodes[current].add(opcode)
        for group in _CALLED.findall(rest):
            calls[current].update(c.strip().lstrip("%") for c in group.split(","))
        if opcode == "while" and current == entry and body is None:
            body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
    reachable, todo = set(), [body]
    while todo:
        c = todo.pop()
        if c not in reachable:
            reachable.add(c)
            todo.extend(calls[c])
    in_loop = {n for n, c in computation_of.items() if c in reachable}
    dots = {n for n, (op, _, called) in ops.items() if op == "dot" or (called and "dot" in opcodes[called.group(1)])}
    described = {n: (op, n in dots, [shapes.get(o, []) for o in operands]) for n, (op, operands, _) in ops.items()}
    return described, in_loop


def kind_of(opcode: str, dot: bool, operand_dims: list, slots: int, weight_sizes: set, table_size: int) -> str:
    sizes = {int(np.prod(d)) for d in operand_dims if d}
    on_slots = any(slots in d for d in operand_dims)
    if dot and on_slots:
        return "attention dots"
    if on_slots:
        return "slot-axis ops"
    if dot and table_size in sizes:
        return "LM head"
    if dot and sizes & weight_sizes:
        return "layer matvecs"
    return "other ops"


def op_seconds(trace_dir: str) -> dict:
    """{op name: seconds} of the XLA:CPU ops recorded under `trace_dir` (summed over the times each ran)."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    seconds = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):  # the CPU client's threads: one event per executed op
                for ev in line.events:
                    seconds[ev.name] += ev.duration_ns / 1e9
    return seconds


def profile(engine: Engine, pre, batch: int, new_tokens: int) -> dict:
    """One row of the table: seconds per decode step by kind, and bytes read per step."""
    before = set(engine.runtime.executables)
    engine.decode(tile(pre, batch), new_tokens)  # compiles this batch's loop
    exe = next(v for k, v in engine.runtime.executables.items() if k[0] is decode_loop and k not in before)
    ops, in_loop = parse_hlo(exe.as_text())
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            g = engine.decode(tile(pre, batch), new_tokens)
        seconds = op_seconds(trace)
    steps, wall = g[0].stats["generated_tokens"], g[0].stats["decode_s"]
    slots = g[0].stats["decode_buffer_slots"]
    cfg, params, L = engine.cfg, engine.params, engine.cfg.num_layers  # as the engine holds them
    if cfg.scan_layers:  # (one layer's size, all layers' size) of each weight matrix; norms' scales left out
        mats = [(x.size // L, x.size) for x in jax.tree.leaves(params["layers"]) if x.ndim >= 3]
    else:  # per layer, fused q/k/v and gate/up when the decode is split
        mats = [(x.size, x.size) for i in range(L) for x in jax.tree.leaves(params[f"layer_{i}"]) if x.ndim >= 2]
    weight_sizes = {one for one, _ in mats}
    table = cfg.vocab_size * cfg.hidden_size
    by_kind = collections.Counter()
    for name, s in seconds.items():
        if name not in ops or ops[name][0] in ("while", "conditional", "call"):
            continue  # thunk executor markers, "end: ..." events, the loop itself
        if name in in_loop:
            by_kind[kind_of(*ops[name], slots, weight_sizes, table)] += s
        else:
            by_kind["per call"] += s
    by_kind["between ops"] = max(wall - sum(by_kind.values()), 0.0)
    held = int(np.mean([x.stats["peak_cache_slots"] for x in g]))
    kv_bytes = 4 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    read = {
        "layer matvecs": 4 * sum(total for _, total in mats),
        "LM head": 4 * table,
        "attention dots": batch * slots * kv_bytes,  # the buffer's slots are read whether held or not
    }
    return dict(
        cache=engine.cache_kind,
        batch=batch,
        steps=steps,
        tok_s=batch * steps / wall,
        held_slots=held,
        buffer_slots=slots,
        ms={k: 1e3 * by_kind[k] / steps for k in KINDS},
        mb_read={k: v / 2**20 for k, v in read.items()},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024, help="prompt tokens")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--caches", nargs="+", default=["full", "anchor"], choices=["full", "anchor"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "profile_decode"), help="path stem for .json and .md")
    args = p.parse_args()
    if args.length < 2 or min(args.batches) < 1 or args.new_tokens < 1:
        p.error("need --length >= 2, --batches >= 1 and --new-tokens >= 1")

    cfg, params, tokenizer = load_model(None, scan_layers=True)
    peak = machine_peaks(repeats=3)
    prompt = english_tokens(tokenizer, args.length)[: args.length]
    rows = []
    for cache in args.caches:
        engine = Engine(cfg, params, tokenizer, config=EngineConfig(cache=cache, anchor_mode="ep"))
        pre = engine.prefill([prompt], 1, 256, args.length + args.new_tokens)
        for B in args.batches:
            rows.append(profile(engine, pre, B, args.new_tokens))
            print(json.dumps(rows[-1]), flush=True)
        del engine, pre
    md = markdown(rows, peak, args)
    print("\n" + md)
    out = Path(args.out)
    outputs.write_report(out.parent, out.name, md, {"args": vars(args), "machine": peak, "rows": rows})
    print(f"saved {out.with_suffix('.json')} and .md")


def markdown(rows: list[dict], peak: dict, args) -> str:
    gbs = max(peak["sum_gbs"], peak["matvec_gbs"])
    lines = [
        f"SmolLM2-135M fp32 decode, {jax.default_backend()}, {args.length}-token prompt, {args.new_tokens} steps, "
        f"one profiled run per row; ms per step (share); bandwidth measured {gbs:.1f} GB/s",
        "",
        "| cache | batch | tok/s | " + " | ".join(KINDS) + " | read GB/s (matvecs, head, attention) |",
        "|---|---:|---:|" + "---:|" * len(KINDS) + "---|",
    ]
    for r in rows:
        total = sum(r["ms"].values())
        cells = [f"{r['ms'][k]:.1f} ({100 * r['ms'][k] / total:.0f}%)" for k in KINDS]
        rates = [
            f"{r['mb_read'][k] * 2**20 / 1e9 / (r['ms'][k] / 1e3):.1f}" if r["ms"][k] else "-"
            for k in ("layer matvecs", "LM head", "attention dots")
        ]
        lines.append(
            f"| {r['cache']} | {r['batch']} | {r['tok_s']:.1f} | " + " | ".join(cells) + f" | {', '.join(rates)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
