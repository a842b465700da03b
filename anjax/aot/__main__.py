"""`python -m anjax.aot`: ahead-of-time compilation for a topology that is not attached (the `anjax.aot` package).

    python -m anjax.aot --config configs/llama2-7b-ac.yaml --topology v5p:4x4x4 [--set key=value ...] [--json]
    python -m anjax.aot --config ... --topology v5e:2x2 --step prefill --step decode \\
        --batch 8 --capacity 2048 --chunk 256

The train step's report is `anjax.aot.train`'s; the engine's prefill/decode, the server's step and the slots
that fit are `anjax.aot.serve`'s (one device unless `--mesh`). Every report carries its provenance
(`anjax.eval.provenance`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from anjax import cli
from anjax.aot import serve
from anjax.aot.report import format_report
from anjax.aot.shapes import MODEL_SHAPES, model_config
from anjax.aot.target import attention_path, make_target, quiet_libtpu, target_attention
from anjax.aot.train import train_report
from anjax.core.config import DTYPES, num_params
from anjax.eval import provenance
from anjax.train import run_config


def earlier_search(path: Path | None) -> dict[str, Any] | None:
    """The slots search of an earlier `--step slots --json` report (`--slots-from`), to continue; None without."""
    if path is None:
        return None
    text = cli.check_readable_file(path, "--slots-from").read_text()
    try:
        report = json.loads(text)
        return next(s for s in report["steps"] if "search" in s)
    except (ValueError, KeyError, TypeError, StopIteration):
        raise cli.UsageError(f"--slots-from {path}: not a `python -m anjax.aot --step slots --json` report") from None


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m anjax.aot", description=cli.summary(__doc__))
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
        choices=("train", *serve.STEPS, "slots"),
        default=None,
        help="what to compile (repeatable; default train): the train step, the engine's prefill chunk or decode "
        "loop, the server's decode step over --batch slots, or slots: the most server slots of --capacity that fit",
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
        help="inference steps over D x T devices as the engine places them (anjax.aot.serve); default one device",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="inference parameters and compute (default: the config's)"
    )
    parser.add_argument(
        "--slots-from",
        type=Path,
        default=None,
        metavar="REPORT",
        help="continue the unbracketed slots search of this earlier `--step slots --json` report (same arguments)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    prov = provenance.begin("python -m anjax.aot", sys.argv[1:] if argv is None else argv)
    for name in ("batch", "capacity", "chunk", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    earlier = earlier_search(args.slots_from)
    rc = run_config.load(args.config, cli.overrides(args))
    cfg = model_config(rc, args.model_shape)
    if args.cache == "anchor" and not cfg.anchor_ids:
        raise ValueError("--cache anchor needs anchors: the config's anchors.mode is none")
    quiet_libtpu()
    target = make_target(args.topology)
    cfg = target_attention(cfg, target)
    steps = []
    icfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype) if args.dtype else cfg  # inference steps
    anchor = (args.cache or ("anchor" if cfg.anchor_ids else "full")) == "anchor"
    mesh = args.mesh or {"data": 1, "tensor": 1}  # one device, as the engine runs by default
    for step in args.step or ["train"]:
        if step == "train":
            steps.append(train_report(rc, cfg, target))
        elif step == "slots":
            steps.append(serve.max_slots(icfg, target, mesh, args.capacity, anchor, earlier))
        else:
            sizes = (args.batch, args.capacity, args.chunk, args.new_tokens, anchor)
            steps.append(serve.serving_report(step, icfg, target, mesh, *sizes))
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
        "provenance": prov.finish(),
    }
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    cli.run(main)
