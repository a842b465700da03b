"""What the benchmark scripts share: timing, the machine's measured peaks, real-text prompts, the decode
measurement (anjax's engine and HF transformers on the same prompt) and the result files.

Scripts here import it as `common` (Python puts a script's directory first on sys.path); the finished
investigations under investigations/ run as modules from the repository root and import `benchmarks.common`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from anjax.eval import provenance
from anjax.io import outputs

if TYPE_CHECKING:
    from anjax.inference.engine import Engine
    from anjax.inference.steps import Prefilled

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- timing and the machine


def best_seconds(f: Callable, *args, repeats: int) -> float:
    """The fastest of `repeats` calls of `f(*args)` (outputs ready), after one call that compiles."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(dtype: str = "float32", n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] in `dtype`, best of `repeats` (a shared machine's load only lowers it)."""
    a = jnp.ones((n, n), dtype)
    return 2 * n**3 / best_seconds(jax.jit(jnp.matmul), a, a, repeats=repeats)


def machine_peaks(n: int = 2048, mb: int = 512, repeats: int = 5) -> dict:
    """{"matmul_gflops": fp32 [n, n] @ [n, n], "sum_gbs": a jitted sum of `mb` MB, "matvec_gbs": [r, 8192] @ [8192]}."""
    big = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    total = best_seconds(jax.jit(jnp.sum), big, repeats=repeats)
    matvec = best_seconds(jax.jit(jnp.matmul), big.reshape(-1, 8192), jnp.ones((8192,)), repeats=repeats)
    return {
        "matmul_gflops": matmul_peak("float32", n, repeats) / 1e9,
        "sum_gbs": big.nbytes / total / 1e9,
        "matvec_gbs": big.nbytes / matvec / 1e9,
    }


# ----------------------------------------------------------------------------- decode: anjax and transformers


def english_tokens(tokenizer, n: int) -> list[int]:
    """At least n token ids of English prose (CPython's pydoc topics, repeated if needed)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def tile(pre: Prefilled, batch: int) -> Prefilled:
    """B copies of a one-row prefilled batch (the batch axis is 1 in stacked keys/values [L, B, K, C, D] and a
    policy's mass [L, B, K, C], 0 elsewhere: per-layer buffers [B, K, C, D] and every [B, ...] field)."""
    repeat = lambda axis: lambda x: jnp.repeat(x, batch, axis=axis)  # noqa: E731
    s = pre.state
    kv_axis = 0 if isinstance(s.cache.keys, tuple) else 1
    kv = {name: jax.tree.map(repeat(kv_axis), getattr(s.cache, name)) for name in ("keys", "values")}
    rows = jax.tree.map(repeat(0), s.replace(cache=s.cache.replace(keys=(), values=()), mass=None))
    state = rows.replace(cache=rows.cache.replace(**kv), mass=None if s.mass is None else repeat(1)(s.mass))
    return dataclasses.replace(pre, state=state, rows=pre.rows * batch, protected=pre.protected * batch, n=batch)


def bench_engine(engine: Engine, prompt: list[int], batches, args) -> dict:
    """{"prefill": tok/s at batch 1, "held": slots kept, B: {"decode": tok/s, "kv_mb": decode buffer MB} or None
    where the full-size KV would pass --max-kv-gb}; best of --repeats. Decode at batch B starts from B copies
    of the prefilled row (rows are independent: the same work per row as B different prompts)."""
    capacity = args.anchor_capacity if engine.spec.anchor_cache else len(prompt) + args.new_tokens
    pres = [engine.prefill([prompt], 1, args.chunk_size, capacity) for _ in range(args.repeats)]
    out = {"prefill": max((len(prompt) - 1) / p.seconds for p in pres), "held": int(pres[0].state.cache.length[0])}
    pre = pres[-1]
    for b in batches:
        cfg = engine.cfg
        if 2 * cfg.num_layers * b * (capacity + 1) * cfg.num_kv_heads * cfg.head_dim * 4 / 1e9 > args.max_kv_gb:
            out[b] = None
            continue
        runs = []
        for _ in range(args.repeats):
            g = engine.decode(tile(pre, b), args.new_tokens)
            tok_s = sum(x.stats["generated_tokens"] for x in g) / g[0].stats["decode_s"]
            runs.append((tok_s, g[0].stats["decode_buffer_bytes"] * b / 1e6))
        out[b] = {"decode": max(r[0] for r in runs), "kv_mb": runs[0][1]}
    return out


def hf_model():
    """The embedded SmolLM2 GGUF in HF transformers (torch CPU, fp32)."""
    import torch
    import transformers

    from anjax.io.gguf_import import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def bench_hf(model, prompt: list[int], args) -> dict:
    """Best prefill and decode tok/s over the torch thread counts of --hf-threads."""
    import torch

    runs = []
    for threads in args.hf_threads:
        torch.set_num_threads(threads)
        runs.append(hf_run(model, torch.tensor([prompt]), args))
        print(f"HF transformers, {len(prompt)} tokens, {threads} torch threads: {json.dumps(runs[-1])}", flush=True)
    return {key: max((r[key] for r in runs if r[key]), default=None) for key in runs[0]}


def hf_run(model, ids, args) -> dict:
    """Greedy generation: prefill tok/s = prompt / time(1 token); decode tok/s = new tokens / (time(1 + new
    tokens) - time(1 token)), best of --repeats after a warm-up."""
    import torch

    def run(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t0

    run(1)
    first = min(run(1) for _ in range(args.repeats))
    total = min(run(args.new_tokens + 1) for _ in range(args.repeats))
    # decode: None when the difference of the two timings is lost in their noise (long prompts, busy machine)
    return {"prefill": ids.shape[1] / first, "decode": args.new_tokens / (total - first) if total > first else None}


# ----------------------------------------------------------------------------- tables, plots, result files


def fmt(x, spec: str = ".1f") -> str:
    """A table cell: `x` formatted, "-" for None."""
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    """a / b, None where either is missing or zero."""
    return a / b if a and b else None


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def begin(script: str, argv: list[str] | None = None) -> provenance.Provenance:
    """The start of the provenance record of a run of `script` with `argv` (default sys.argv[1:]): the command
    line, then (`save`) the commit, the libraries, the machine and its load."""
    return provenance.begin(f"python {provenance.relative(script)}", argv)


def save(
    stem: str | Path,
    data: dict,
    prov: provenance.Provenance,
    markdown: str | None = None,
    plot: Callable | None = None,
) -> None:
    """STEM.json (`data` and its provenance), STEM.md (`markdown`) and STEM.png (`plot(data, file)`), each
    written atomically."""
    stem = Path(stem)
    data = {**data, "provenance": prov.finish()}
    outputs.write_text(stem.with_suffix(".json"), json.dumps(data, indent=1, default=str) + "\n")
    saved = [stem.with_suffix(".json")]
    if markdown is not None:
        outputs.write_text(stem.with_suffix(".md"), markdown + "\n")
        saved.append(stem.with_suffix(".md"))
    if plot is not None:
        png = io.BytesIO()
        plot(data, png)
        pyplot().close("all")
        saved.append(outputs.write_bytes_chunks(stem.with_suffix(".png"), [png.getvalue()]))
    print("saved " + ", ".join(map(str, saved)), flush=True)
