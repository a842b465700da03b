"""Compile a lowered program for a target and report its per-device memory, fit and roofline time."""

from __future__ import annotations

import math
from typing import Any

import jax

from anjax.aot.target import GiB, Target

PALLAS_CUSTOM_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton")  # custom-call targets of Mosaic / Triton kernels


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def largest_arguments(named: dict[str, Any], top: int = 5) -> list[dict]:
    """The biggest per-device input buffers, by path."""
    leaves = [
        (f"{group}{jax.tree_util.keystr(path)}", _shard_bytes(x))
        for group, tree in named.items()
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    ]
    return [{"name": n, "bytes": b} for n, b in sorted(leaves, key=lambda t: -t[1])[:top]]


def compile_report(
    lowered: jax.stages.Lowered,
    target: Target,
    named_args: dict[str, Any],
    model_flops: float,
    hw_flops: float,
    hbm_bytes: float,
) -> dict[str, Any]:
    """Compile and report per-device memory, fit, FLOPs and the step-time estimate.

    `model_flops`, `hw_flops` and `hbm_bytes` are per device. An executable that does not fit the HBM
    is reported (fits: false, the compiler's message) with the largest arguments, not raised."""
    text = lowered.as_text()
    report: dict[str, Any] = {
        # custom calls of Pallas kernels in the lowered program: Mosaic (TPU), Triton (GPU)
        "pallas_kernel_calls": sum(text.count(f"@{name}(") for name in PALLAS_CUSTOM_CALLS),
        "hbm_bytes": target.hbm_bytes,
        "argument_bytes_by_group": {g: sum(_shard_bytes(x) for x in jax.tree.leaves(t)) for g, t in named_args.items()},
        "largest_arguments": largest_arguments(named_args),
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return {**report, "fits": False, "compiler_error": lines[:12]}
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"the {target.name} compiler gives no memory analysis")
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}  # GPU: None
    compute_s, memory_s = hw_flops / target.peak_flops, hbm_bytes / target.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    return {
        **report,
        "fits": total <= target.hbm_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "total_bytes": total,
        "model_flops": model_flops,
        "hardware_flops": hw_flops,
        "hbm_traffic_bytes": hbm_bytes,
        "xla_flops_loop_bodies_once": cost.get("flops"),
        "xla_bytes_accessed_loop_bodies_once": cost.get("bytes accessed"),
        "compute_bound_s": compute_s,
        "memory_bound_s": memory_s,
        "step_s": step_s,
        "mfu": model_flops / (step_s * target.peak_flops) if step_s else None,
    }


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
        if "max_batch" in s:
            tried = ", ".join(f"{t['batch']} {'fits' if t['fits'] else 'no'}" for t in s["search"])
            lines.append(f"  most slots that fit: {s['max_batch']} (compiled: {tried})")
        if not s["fits"] or "total_bytes" not in s:
            lines.append(
                "  largest arguments: " + ", ".join(f"{a['name']} {_gib(a['bytes'])}" for a in s["largest_arguments"])
            )
            lines.append(
                "  arguments by group: " + ", ".join(f"{g} {_gib(b)}" for g, b in s["argument_bytes_by_group"].items())
            )
    return "\n".join(lines)
