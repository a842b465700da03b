"""Serving AOT: the engine's prefill chunk or decode loop compiled for a (data, tensor) mesh of a target topology.

    python -m anjax.aot --topology v5e:2x4 --model-shape llama2-7b --dtype bfloat16 --mesh data=2,tensor=4 \\
        --step prefill --step decode --batch 16 --capacity 4096

Everything is placed as `Engine` places it over `--mesh` (`anjax.inference.placement`): weights by their logical
axes (heads, KV heads, MLP and vocabulary over tensor), the cache's rows over data and its KV heads over tensor,
the sampling arrays replicated. Memory is the compiler's, per device (`anjax.train.aot.compile_report`); FLOPs
and HBM traffic are counted from the shapes and divided over the devices that share them: the weights over
tensor, the rows (and their cache) over data x tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.core.model import init_boxed
from anjax.inference import placement
from anjax.inference.sampling import MAX_STOP_IDS, Sampling
from anjax.inference.state import EngineSpec, init_state
from anjax.inference.steps import decode_loop, prefill
from anjax.train.aot import Target, compile_report, forward_flops, kv_bytes, num_params


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
    """The engine's `prefill` of one chunk [batch, chunk] (cache of capacity + chunk slots) or its `decode_loop`
    of `new_tokens` steps (cache of `capacity` slots) over the first data x tensor devices of `target`."""
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
    placed = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
    boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.key(0)))
    params = placed(nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh))
    slots = capacity + chunk if step == "prefill" else capacity
    state = jax.eval_shape(lambda: init_state(cfg, batch, slots, jnp.zeros((batch,), bool)))
    state = placed(state, jax.tree.map(lambda s: NamedSharding(mesh, s), placement.state_specs(state, mesh)))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    row = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows)  # noqa: E731
    if step == "prefill":
        chunk_BxT = lambda dtype: jax.ShapeDtypeStruct((batch, chunk), dtype, sharding=rows)  # noqa: E731
        args = (params, state, chunk_BxT(jnp.int32), chunk_BxT(jnp.bool_), chunk_BxT(jnp.bool_))
        fn, donate, tokens, keys = functools.partial(prefill, cfg, spec), (1,), batch * chunk, slots
        extra = {"chunk": chunk}
    else:
        replicated = NamedSharding(mesh, P())
        samp = Sampling(
            temperature=row(jnp.float32),
            top_k=row(jnp.int32),
            top_p=row(jnp.float32),
            seed=row(jnp.uint32),
            stop_ids=jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32, sharding=replicated),
            max_sentence_tokens=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        )
        args = (params, state, row(jnp.int32), row(jnp.bool_), samp)
        fn = functools.partial(decode_loop, cfg, spec, capacity, new_tokens)
        donate, tokens, keys = (), batch, capacity + 1
        extra = {"new_tokens": new_tokens, "per": "token"}
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
