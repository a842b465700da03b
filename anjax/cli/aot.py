"""`python -m anjax.aot`: ahead-of-time compilation for a topology that is not attached (`anjax.train.aot`).

The command; the train step's report is `anjax.train.aot`'s, the engine's prefill/decode report
`anjax.cli.serve_aot`'s (one device unless `--mesh`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from anjax import cli
from anjax.cli import serve_aot
from anjax.core.config import DTYPES
from anjax.train import run_config
from anjax.train.aot import (
    MODEL_SHAPES,
    GiB,
    attention_path,
    make_target,
    model_config,
    num_params,
    target_attention,
    train_report,
)


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
            mesh = args.mesh or {"data": 1, "tensor": 1}  # one device, as the engine runs by default
            steps.append(serve_aot.serving_report(step, icfg, target, mesh, *sizes))
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
