"""Step-time cost of self-distillation (anjax.train.distill): the LM-only step and the distillation step of one
run config, alternating in one process on the same batches after both are compiled (not a test).

    python -m benchmarks.investigations.distill.bench_distill --config configs/smollm2-135m-ac.yaml --steps 2

Prints the median seconds per step of each and their ratio. Alternating keeps a shared machine's load
the same for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax

from anjax.core import sharding  # noqa: E402
from anjax.train import run_config, setup  # noqa: E402
from anjax.train.prepare import make_batches  # noqa: E402
from anjax.train.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each")
    parser.add_argument("--weight", type=float, default=1.0, help="train.distill_weight of the distillation step")
    args = parser.parse_args(argv)
    rc = run_config.load(args.config)
    cfg, params, tokenizer = setup.fresh_model(rc)
    mesh = setup.make_run_mesh(rc)
    it = make_batches(rc.data, tokenizer, setup.run_scheme(cfg, tokenizer), train=True)
    batches = [sharding.host_batch_to_global(it.batch(i), mesh) for i in range(args.steps + 1)]
    runs = {}
    for weight in (0.0, args.weight):
        trainer = Trainer(cfg, dataclasses.replace(rc.train, distill_weight=weight), mesh, rc.run.seed)
        state = trainer.init_state(params)
        if trainer.distill:
            trainer.init_teacher(params)
        state, m = trainer.train_step(state, batches[0])  # compile
        jax.block_until_ready(m)
        runs[weight] = [trainer, state, []]
    for batch in batches[1:]:
        for run in runs.values():
            t = time.perf_counter()
            run[1], m = run[0].train_step(run[1], batch)
            jax.block_until_ready(m)
            run[2].append(time.perf_counter() - t)
    plain, distill = (statistics.median(run[2]) for run in runs.values())
    print(f"{args.config}: s/step LM only {plain:.3f}, distillation {distill:.3f}, ratio {distill / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
