"""`python -m anjax.aot`: ahead-of-time compilation for a topology that is not attached (`anjax.train.aot`).

The command and the engine's prefill/decode report (the engine is inference, the library is train: both meet here).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from anjax import cli
from anjax.cli import serve_aot
from anjax.core.config import DTYPES, ModelConfig
from anjax.core.model import init_params
from anjax.inference import engine as generate
from anjax.train import run_config
from anjax.train.aot import (
    MODEL_SHAPES,
    GiB,
    Target,
    attention_path,
    compile_report,
    forward_flops,
    kv_bytes,
    make_target,
    model_config,
    num_params,
    target_attention,
    train_report,
)


def inference_report(
    step: str,
    cfg: ModelConfig,
    target: Target,
    batch: int,
    capacity: int,
    chunk: int,
    new_tokens: int,
    anchor_cache: bool,
) -> dict[str, Any]:
    """The engine's prefill chunk or decode loop for [batch] rows on one device of `target`.

    Prefill: one chunk of `chunk` tokens into a cache of capacity + chunk slots (`prefill`).
    Decode: `decode_loop` for `new_tokens` steps from a cache of `capacity` slots; FLOPs and time per token."""
    dev = SingleDeviceSharding(target.devices[0])
    ac_id = cfg.anchor_ids[0] if cfg.anchor_mode == "ac" else -1
    spec = generate.EngineSpec(anchor_cache=anchor_cache, anchor_ids=cfg.anchor_ids, ac_id=ac_id)
    on_dev = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)
    params = on_dev(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
    slots = capacity + chunk if step == "prefill" else capacity
    state = on_dev(jax.eval_shape(lambda: generate.init_state(cfg, batch, slots, jnp.zeros((batch,), bool))))
    row = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=dev)
    if step == "prefill":
        chunk_BxT = lambda dtype: jax.ShapeDtypeStruct((batch, chunk), dtype, sharding=dev)
        args = (params, state, chunk_BxT(jnp.int32), chunk_BxT(jnp.bool_), chunk_BxT(jnp.bool_))
        fn, donate, tokens, keys = functools.partial(generate.prefill, cfg, spec), (1,), batch * chunk, slots
        extra = {"chunk": chunk}
    else:
        samp = generate.Sampling(
            temperature=row(jnp.float32),
            top_k=row(jnp.int32),
            top_p=row(jnp.float32),
            seed=row(jnp.uint32),
            stop_ids=jax.ShapeDtypeStruct((generate.MAX_STOP_IDS,), jnp.int32, sharding=dev),
            max_sentence_tokens=jax.ShapeDtypeStruct((), jnp.int32, sharding=dev),
        )
        args = (params, state, row(jnp.int32), row(jnp.bool_), samp)
        fn = functools.partial(generate.decode_loop, cfg, spec, capacity, new_tokens)
        donate, tokens, keys = (), batch, capacity + 1
        extra = {"new_tokens": new_tokens, "per": "token"}
    flops = forward_flops(cfg, tokens, keys)
    hbm = num_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize + kv_bytes(cfg, batch, keys)
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    report = compile_report(lowered, target, {"params": params, "state": state}, flops, flops, hbm)
    return {
        "step": step,
        "batch": batch,
        "capacity": capacity,
        "cache": "anchor" if anchor_cache else "full",
        **extra,
        **report,
    }


# ----------------------------------------------------------------------------- CLI


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    head = {k: r[k] for k in ("topology", "devices", "device_kind", "model") if k in r}
    lines = [" ".join(f"{k}={v}" for k, v in head.items())]
    for s in r["steps"]:
        lines.append(
            f"[{s['step']}] "
            + ", ".join(
                f"{k}={s[k]}"
                for k in (
                    "mesh",
                    "global_batch",
                    "seq_len",
                    "grad_accum",
                    "rows_per_device",
                    "batch",
                    "capacity",
                    "chunk",
                    "new_tokens",
                    "cache",
                )
                if k in s
            )
        )
        lines.append(
            f"  fits: {str(s['fits']).lower()}  HBM per device {_gib(s['hbm_bytes'])}  "
            f"Pallas kernel calls {s['pallas_kernel_calls']}"
        )
        if "total_bytes" in s:
            lines.append(
                "  per device: "
                + ", ".join(f"{k} {_gib(s[k + '_bytes'])}" for k in ("argument", "output", "alias", "temp", "total"))
            )
            per = " per token" if s.get("per") == "token" else " per step"
            lines.append(
                f"  model FLOPs{per} {s['model_flops']:.3e}, hardware {s['hardware_flops']:.3e}, "
                f"HBM traffic {_gib(s['hbm_traffic_bytes'])}; estimated time {s['step_s'] * 1e3:.2f} ms "
                f"(compute {s['compute_bound_s'] * 1e3:.2f}, memory {s['memory_bound_s'] * 1e3:.2f}), "
                f"MFU {s['mfu']:.1%}"
            )
        else:
            lines += [f"  compiler: {ln}" for ln in s["compiler_error"][:6]]
        if not s["fits"] or "total_bytes" not in s:
            lines.append(
                "  largest arguments: " + ", ".join(f"{a['name']} {_gib(a['bytes'])}" for a in s["largest_arguments"])
            )
            lines.append(
                "  arguments by group: " + ", ".join(f"{g} {_gib(b)}" for g, b in s["argument_bytes_by_group"].items())
            )
    return "\n".join(lines)


def _quiet_libtpu() -> None:
    """Compile-only use of libtpu and the CUDA plugin: the host backend is the CPU, libtpu skips its TPU-host
    discovery and the CUDA plugin registers without CUDA libraries (it only compiles)."""
    jax.config.update("jax_platforms", "cpu")
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m anjax.aot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--topology",
        required=True,
        help="TPU topology GEN:AxB[xC] (e.g. v5e:16x16, v5p:4x4x4, v4:2x2x4) or h100:N (N <= 8 GPUs)",
    )
    cli.add_run_config_args(parser, "YAML run config (as for train.py)", "data.batch_size=64 mesh.fsdp=-1")
    parser.add_argument(
        "--model-shape",
        choices=sorted(MODEL_SHAPES),
        default=None,
        help="model shape to use instead of model.path (weights are never read)",
    )
    parser.add_argument(
        "--step",
        action="append",
        choices=("train", "prefill", "decode"),
        default=None,
        help="what to compile (repeatable; default train)",
    )
    parser.add_argument("--batch", type=int, default=8, help="inference rows")
    parser.add_argument("--capacity", type=int, default=2048, help="inference cache slots kept per row")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk in tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode loop length")
    parser.add_argument(
        "--cache",
        choices=("anchor", "full"),
        default=None,
        help="inference cache (default: anchor when the model has anchors)",
    )
    parser.add_argument(
        "--mesh",
        type=cli.parse_mesh,
        default=None,
        metavar="data=D,tensor=T",
        help="prefill/decode over D x T devices as the engine places them (anjax.cli.serve_aot); default one device",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="prefill/decode parameters and compute (default: the config's)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "capacity", "chunk", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rc = run_config.load(args.config, cli.overrides(args))
    cfg = model_config(rc, args.model_shape)
    if args.cache == "anchor" and not cfg.anchor_ids:
        raise ValueError("--cache anchor needs anchors: the config's anchors.mode is none")
    _quiet_libtpu()
    target = make_target(args.topology)
    cfg = target_attention(cfg, target)
    steps = []
    icfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype) if args.dtype else cfg  # prefill/decode
    for step in args.step or ["train"]:
        if step == "train":
            steps.append(train_report(rc, cfg, target))
        else:
            anchor = (args.cache or ("anchor" if cfg.anchor_ids else "full")) == "anchor"
            sizes = (args.batch, args.capacity, args.chunk, args.new_tokens, anchor)
            if args.mesh:
                steps.append(serve_aot.serving_report(step, icfg, target, args.mesh, *sizes))
            else:
                steps.append(inference_report(step, icfg, target, *sizes))
    report = {
        "config": args.config,
        "topology": target.name,
        "devices": len(target.devices),
        "device_kind": target.devices[0].device_kind,
        "model": dict(
            params=num_params(cfg),
            layers=cfg.num_layers,
            hidden=cfg.hidden_size,
            vocab=cfg.vocab_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            inference_dtype=icfg.dtype,
            remat=cfg.remat,
            scan_layers=cfg.scan_layers,
            attention=cfg.attention,
            attention_path=attention_path(cfg),
        ),
        "peak_flops_per_device": target.peak_flops,
        "hbm_bytes_per_s_per_device": target.hbm_bytes_per_s,
        "steps": steps,
    }
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
