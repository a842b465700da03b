"""Continued pre-training, SFT or from-scratch training of an AnLLM, sharded over a (data, fsdp, tensor) mesh.

    python train.py --config configs/smollm2-135m-ac.yaml [--set key.path=value ...]

Resumes from the latest checkpoint in run.dir; SIGTERM or Ctrl-C (SIGINT) saves a
checkpoint and exits 0 (a second signal exits at once, the last checkpoint intact);
a non-finite loss stops the run with the last good checkpoint intact.
At the end: RUN/export (Hugging Face format) and RUN/loss.png. See README.
"""

from __future__ import annotations

import sys

from anjax import cli
from anjax.io import outputs
from anjax.io import run_dir as run_dir_files


def check_outputs(rc) -> None:
    """run.dir must be local, writable and anjax's (`outputs.claim_run_dir`; RUN/export replaceable), or gs://
    that can be served, and data.path local, a hub name or gs://, before anything loads."""
    if rc.data.path:
        run_dir_files.storage_path(rc.data.path, "data.path")
    if run_dir_files.is_remote(run_dir_files.storage_path(rc.run.dir, "run.dir")):
        return  # a bucket has no local permissions to probe: the first write is the check
    run_dir = outputs.claim_run_dir(cli.check_writable_dir(rc.run.dir, "run.dir"))
    if rc.checkpoint.export_hf:
        outputs.check_replaceable(run_dir / "export")


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="train.py", description=cli.summary(__doc__))
    cli.add_run_config_args(parser, "YAML run config (default: all defaults)", "train.steps=10 run.dir=runs/x")
    args = parser.parse_args(argv)
    from anjax.train import loop, run_config  # after parsing: --help and bad arguments fail before jax loads

    rc = run_config.load(args.config, cli.overrides(args))
    check_outputs(rc)
    try:
        return loop.train(rc)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
