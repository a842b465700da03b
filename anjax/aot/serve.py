"""Serving AOT: the engine's prefill chunk, its decode loop or the server's decode step compiled for a
(data, tensor) mesh of a target topology, and the most server slots that fit a device's HBM.

    python -m anjax.aot --topology v5e:2x4 --model-shape llama2-7b --dtype bfloat16 --mesh data=2,tensor=4 \\
        --step prefill --step decode --batch 16 --capacity 4096
    python -m anjax.aot --topology h100:8 --model-shape llama2-7b --dtype bfloat16 --mesh tensor=8 \\
        --step slots --capacity 4096 --cache full

Everything is placed as `Engine` places it over `--mesh` (`anjax.inference.placement`): weights by their logical
axes (heads, KV heads, MLP and vocabulary over tensor), the cache's rows over data and its KV heads over tensor,
the sampling arrays replicated. `serve` is one step of `python -m anjax.serve` (`anjax.serve.scheduler.
generate_step` over `--batch` slots of `--capacity` + 1 cache slots, the slots donated as the scheduler donates
them); `slots` searches the largest such batch that fits. Memory is the compiler's, per device
(`anjax.aot.report.compile_report`); FLOPs and HBM traffic are counted from the shapes and divided over the
devices that share them: the weights over tensor, the rows (and their cache) over data x tensor.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from anjax.aot.report import compile_report
from anjax.aot.shapes import forward_flops
from anjax.aot.target import Target
from anjax.core import sharding
from anjax.core.config import ModelConfig, kv_bytes, num_params
from anjax.core.model import init_boxed
from anjax.inference import placement
from anjax.inference.sampling import MAX_STOP_IDS, Sampling
from anjax.inference.state import EngineSpec, init_state
from anjax.inference.steps import decode_loop, prefill
from anjax.serve import scheduler

STEPS = ("prefill", "decode", "serve")
MAX_SEARCH_COMPILES = 4  # `max_slots`: compiles per search (each is minutes for a 7B on a CPU)


def _placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def serving_report(
    step: str,
    cfg: ModelConfig,
    target: Target,
    mesh_sizes: dict[str, int],
    batch: int,
    capacity: int,
    chunk: int,
    new_tokens: int,
    anchor_cache: bool,
) -> dict[str, Any]:
    """The engine's `prefill` of one chunk [batch, chunk] (cache of capacity + chunk slots), its `decode_loop`
    of `new_tokens` steps (cache of `capacity` slots) or the server's `generate_step` (`batch` slots of
    `capacity` + 1), over the first data x tensor devices of `target`."""
    data, tensor = mesh_sizes["data"], mesh_sizes["tensor"]
    placement.check_tensor(cfg, tensor)
    n = data * tensor
    if n > len(target.devices):
        have = len(target.devices)
        raise ValueError(f"--mesh data={data},tensor={tensor} needs {n} devices, {target.name} has {have}")
    if batch % data:
        raise ValueError(f"--batch {batch} must be a multiple of --mesh data={data}")
    mesh = sharding.make_mesh(data, 1, tensor, target.devices[:n])
    ac_id = cfg.anchor_ids[0] if cfg.anchor_mode == "ac" else -1
    spec = EngineSpec(anchor_cache=anchor_cache, anchor_ids=cfg.anchor_ids, ac_id=ac_id)
    boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.key(0)))
    params = _placed(nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh))
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    placed_state = lambda state: _placed(  # noqa: E731
        state, jax.tree.map(lambda s: NamedSharding(mesh, s), placement.state_specs(state, mesh))
    )
    row = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows)  # noqa: E731
    if step == "prefill":
        slots = capacity + chunk
        state = placed_state(jax.eval_shape(lambda: init_state(cfg, batch, slots, jnp.zeros((batch,), bool))))
        chunk_BxT = lambda dtype: jax.ShapeDtypeStruct((batch, chunk), dtype, sharding=rows)  # noqa: E731
        args = (params, state, chunk_BxT(jnp.int32), chunk_BxT(jnp.bool_), chunk_BxT(jnp.bool_))
        fn, donate, tokens, keys = functools.partial(prefill, cfg, spec), (1,), batch * chunk, slots
        extra = {"chunk": chunk}
    elif step == "decode":
        state = placed_state(jax.eval_shape(lambda: init_state(cfg, batch, capacity, jnp.zeros((batch,), bool))))
        abstract_sampling = dict(
            temperature=row(jnp.float32),
            top_k=row(jnp.int32),
            top_p=row(jnp.float32),
            seed=row(jnp.uint32),
            stop_ids=jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32, sharding=replicated),
            max_sentence_tokens=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        )
        samp = Sampling(**abstract_sampling)  # pyright: ignore[reportArgumentType]  # ShapeDtypeStruct leaves, to lower
        args = (params, state, row(jnp.int32), row(jnp.bool_), samp)
        fn = functools.partial(decode_loop, cfg, spec, capacity, new_tokens)
        donate, tokens, keys = (), batch, capacity + 1
        extra = {"new_tokens": new_tokens, "per": "token"}
    else:  # serve: the scheduler's slots, every per-slot field over data, the stop ids replicated
        slots = jax.eval_shape(lambda: scheduler.init_slots(cfg, batch, capacity, (), 0))

        def on(path, x):  # by name, not by shape: stop_ids [MAX_STOP_IDS] is not per slot even when batch == 8
            per_slot = x.ndim > 0 and x.shape[0] == batch and "stop_ids" not in jax.tree_util.keystr(path)
            return rows if per_slot else replicated

        slots = _placed(slots, jax.tree_util.tree_map_with_path(on, slots)).replace(state=placed_state(slots.state))
        cancel = row(jnp.bool_)
        args = (params, slots, cancel)
        fn, donate, state = functools.partial(scheduler.generate_step, cfg, spec), (1,), slots
        tokens, keys = batch, capacity + 1
        extra = {"per": "token"}
    flops = forward_flops(cfg, tokens, keys) / n
    hbm = num_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize / tensor + kv_bytes(cfg, batch, keys) / n
    with sharding.active(mesh):
        lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    report = compile_report(lowered, target, {"params": params, "state": state}, flops, flops, hbm)
    return {
        "step": step,
        "mesh": {"data": data, "tensor": tensor},
        "batch": batch,
        "rows_per_device": batch // data,
        "capacity": capacity,
        "cache": "anchor" if anchor_cache else "full",
        **extra,
        **report,
    }


def _required_bytes(report: dict[str, Any]) -> float | None:
    """The compiled total, or what a refusing TPU compiler said the program needs ("... required ... (12.3G)")."""
    if "total_bytes" in report:
        return report["total_bytes"]
    for line in report.get("compiler_error", ()):  # the compiler names the temporaries; the arguments come on top
        if m := re.search(r"required for HLO temporaries \(([\d.]+)([GM])\) exceeds", line):
            temps = float(m.group(1)) * (1 << (30 if m.group(2) == "G" else 20))
            return temps + sum(report["argument_bytes_by_group"].values())
    return None


def max_slots(
    cfg: ModelConfig,
    target: Target,
    mesh_sizes: dict[str, int],
    capacity: int,
    anchor_cache: bool,
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The largest server batch (`serve` step, a multiple of data) whose compiled total fits a device's HBM.

    Memory is close to affine in the batch: total(B) = weights + B x (a row's cache, metadata and temporaries).
    The first guess counts the KV bytes alone; each compile's total (or, refused, the total the compiler says it
    needs) gives the per-row cost, hence the next guess, kept strictly between the largest batch that fit and
    the smallest that did not (bisecting where the guess falls outside: on TPUs the temporaries can jump with
    the batch), so that the answer ends bracketed: B fits and B + data does not (or `MAX_SEARCH_COMPILES` are
    spent: `bracketed` false, the search says where). `earlier`, an unbracketed result of this function for the
    same step, is continued: its compiles count as tried and the search bisects between them.
    Returns the `serve` report at the largest batch that fit (`max_batch`; 0 when none
    did) with every compile tried (`search`)."""
    data, tensor = mesh_sizes["data"], mesh_sizes["tensor"]
    down = lambda b: max(data, int(b) // data * data)  # noqa: E731
    tried: dict[int, dict[str, Any]] = {}
    if earlier:
        tried = {t["batch"]: {"fits": t["fits"], "total_bytes": t["total_bytes"]} for t in earlier["search"]}
        if earlier["max_batch"]:  # its full report, returned if no larger batch fits now
            tried[earlier["max_batch"]] = {k: v for k, v in earlier.items() if k not in _SEARCH_KEYS}
    weights = num_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize / tensor
    first = down((target.hbm_bytes - weights) / (kv_bytes(cfg, 1, capacity + 1) / tensor))
    batch = _next_batch(tried, data, None) if tried else first
    compiles = 0
    while batch is not None and compiles < MAX_SEARCH_COMPILES:
        r = tried[batch] = serving_report("serve", cfg, target, mesh_sizes, batch, capacity, 1, 1, anchor_cache)
        compiles += 1
        need = _required_bytes(r)
        fixed = r["argument_bytes_by_group"]["params"] + r.get("code_bytes", 0)
        guess = down((target.hbm_bytes - fixed) / ((need - fixed) / batch)) if need else down(batch / 2)
        batch = _next_batch(tried, data, guess, r["fits"])
    best = max((b for b, t in tried.items() if t["fits"]), default=0)
    search = [{"batch": b, "fits": t["fits"], "total_bytes": _required_bytes(t)} for b, t in sorted(tried.items())]
    bracketed = bool(best) and best + data in tried
    return {**tried[best or min(tried)], "max_batch": best, "bracketed": bracketed, "search": search}


_SEARCH_KEYS = ("max_batch", "bracketed", "search")


def _next_batch(tried: dict[int, dict[str, Any]], data: int, guess: int | None, fitted: bool = False) -> int | None:
    """The next batch to compile: `guess` (from a compile that `fitted` or not) kept strictly between the largest
    fit and the smallest refusal: at or below the fit, the batch above it when a fit guessed so (confirming the
    affine model), else, like a guess at or above the refusal or None, their midpoint (a refusal that guesses
    below a fit means the memory jumped). None once bracketed (fit B, refused B + data) or when the smallest
    batch is refused."""
    best = max((b for b, t in tried.items() if t["fits"]), default=0)
    fail = min((b for b, t in tried.items() if not t["fits"]), default=None)
    if best and best + data in tried or not best and data in tried:
        return None
    if best and guess is not None and guess <= best:
        guess = best + data if fitted else None
    if best and fail is not None and (guess is None or guess >= fail):
        guess = max((best + fail) // 2 // data * data, best + data)
    elif guess is None:  # only refusals (halve) or only fits (double)
        guess = max(data, fail // 2 // data * data) if fail is not None else 2 * best
    guess = max(guess, best + data) if best else guess
    guess = min(guess, fail - data) if fail is not None else guess
    return None if guess in tried else guess
