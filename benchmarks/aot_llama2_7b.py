"""AOT sizing of the paper's 7B recipe (configs/llama2-7b-ac.yaml, 4,096 tokens) on TPU topologies and 8 x H100.

    .venv-tpu/bin/python benchmarks/aot_llama2_7b.py [--reports DIR]

Compiles each (topology, overrides) below with `python -m anjax.aot --json` (minutes each on a CPU) and writes
benchmarks/results/aot_llama2_7b.{json,md}. With --reports DIR, reads DIR/TAG.json reports made by the same
commands instead of compiling.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/llama2-7b-ac.yaml"
# (tag, topology, --set overrides): the shipped config, and the grad_accum each other topology needs.
RUNS = [
    ("v4_ga8", "v4:2x2x4", []),
    ("v4_ga16", "v4:2x2x4", ["train.grad_accum=16"]),
    ("v5p_ga8", "v5p:4x4x4", []),
    ("v5e_ga2", "v5e:16x16", ["train.grad_accum=2"]),
    ("h100_ga16", "h100:8", ["train.grad_accum=16"]),
    ("h100_ga64", "h100:8", ["train.grad_accum=64"]),
]
# The engine's prefill (one 256-token chunk) and decode (128 tokens) for 8 rows, 2,048 slots, bf16 weights.
INFERENCE = ("v5p_inf", "v5p:4x4x4", ["model.param_dtype=bfloat16"])
INFERENCE_ARGS = ["--step", "prefill", "--step", "decode", "--batch", "8", "--capacity", "2048", "--chunk", "256"]
GiB = 1 << 30


def report(tag: str, topology: str, overrides: list[str], reports: Path | None, args: list[str] = ()) -> dict:
    if reports is not None:
        return json.loads((reports / f"{tag}.json").read_text())
    cmd = [sys.executable, "-m", "anjax.aot", "--config", CONFIG, "--topology", topology, "--json", *args]
    cmd += ["--set", *overrides] if overrides else []
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def row(r: dict, overrides: list[str]) -> str:
    s = r["steps"][0]
    micro = s["global_batch"] / s["grad_accum"] / (s["mesh"]["data"] * s["mesh"]["fsdp"])
    mem = (
        f"{s['argument_bytes'] / GiB:.2f} | {s['temp_bytes'] / GiB:.2f} | {s['total_bytes'] / GiB:.2f}"
        if "total_bytes" in s
        else "- | - | > HBM (compiler: " + s["compiler_error"][0].split(", ", 1)[-1] + ")"
    )
    est = f"{s['model_flops']:.3g} | {s['step_s']:.2f} | {s['mfu']:.0%}" if "total_bytes" in s else "- | - | -"
    return (
        f"| {r['topology']} | {r['devices']} × {r['device_kind']} | {', '.join(overrides) or 'as shipped'} | "
        f"{s['grad_accum']} | {micro:g} | {s['hbm_bytes'] / GiB:.2f} | {mem} | "
        f"{'yes' if s['fits'] else '**no**'} | {est} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, default=None, help="read TAG.json reports from this directory")
    args = parser.parse_args()
    reports = {tag: report(tag, topo, sets, args.reports) for tag, topo, sets in RUNS}
    inference = report(*INFERENCE, args.reports, INFERENCE_ARGS)
    out = ROOT / "benchmarks" / "results"
    (out / "aot_llama2_7b.json").write_text(
        json.dumps(
            {
                **{tag: {"topology": topo, "overrides": sets, "report": reports[tag]} for tag, topo, sets in RUNS},
                INFERENCE[0]: {
                    "topology": INFERENCE[1],
                    "overrides": INFERENCE[2],
                    "args": INFERENCE_ARGS,
                    "report": inference,
                },
            },
            indent=1,
        )
    )
    lines = [
        f"# AOT sizing: {CONFIG}, global batch 512 x 4,096 tokens, dense attention",
        "",
        f"Per device; `python -m anjax.aot --config {CONFIG} --topology T [--set ...]`; "
        "model FLOPs per device and step; step time and MFU: the compute-bound estimate at bf16 peak "
        "(remat recomputation counted as hardware FLOPs, not model FLOPs).",
        "",
        "| topology | devices | overrides | grad_accum | rows / device / micro-batch | HBM GiB | arguments GiB "
        "| temporaries GiB | total GiB | fits | model FLOPs | est. step s | MFU bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(reports[tag], sets) for tag, _, sets in RUNS]
    lines += [
        "",
        f"Inference engine on one {inference['device_kind']} ({' '.join(INFERENCE_ARGS)}, "
        f"{', '.join(INFERENCE[2])}; decode: per token; time = max(FLOPs / peak, (weights + KV) / bandwidth)):",
        "",
        "| step | arguments GiB | temporaries GiB | total GiB | fits | FLOPs | est. ms |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['step']} | {s['argument_bytes'] / GiB:.2f} | {s['temp_bytes'] / GiB:.2f} | "
        f"{s['total_bytes'] / GiB:.2f} | {'yes' if s['fits'] else '**no**'} | {s['model_flops']:.3g} | "
        f"{s['step_s'] * 1e3:.2f} |"
        for s in inference["steps"]
    ]
    (out / "aot_llama2_7b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
