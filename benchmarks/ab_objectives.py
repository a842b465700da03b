"""A/B of training recipes at equal wall-clock: held-out loss (anchor mask) against seconds.

    python benchmarks/ab_objectives.py --config configs/smollm2-135m-ac-ab.yaml --seconds 1800 \\
        --arm lm= --arm distill=train.distill_weight=1.0 --arm lm-lr3e-4=train.lr=3e-4

Every arm is one `train.py` run (`--set run.dir=OUT/NAME` plus the arm's comma-separated
overrides) with the same config, data order and seed. All arms start together and run
side by side, so they share the machine equally (on a shared 2-core machine that is the
only fair clock); each gets SIGTERM after `--seconds` (train.py saves and exits 0), and
a rerun resumes them. Training seconds are train.py's `train_s` (time inside optimizer
steps, validation excluded), so a slower objective pays for its extra compute.
With `--sequential` the arms run one after another, each to its last step (or `--seconds`
each), and compare at equal steps: for arms that cost the same per step, in a fraction of
the memory (one model and optimizer at a time); a rerun skips finished arms and resumes.
Choose by held-out loss: the arm with the lowest anchor-mode validation loss at the
common end of the clock, with the full-attention loss beside it (forgetting shows there).
With `--ppl "ARGS"` each arm that reached its last step is also measured on held-out text
(`python -m anjax.evaluate --perplexity --model OUT/NAME --cache full,anchor ARGS`, into
OUT/NAME.ppl.json, unless there): text tokens only, so arms with and without `<AC>` compare on
the same targets, which their validation losses do not (`anjax.train.ab`).
Prints a table and saves OUT/ab.{json,md,png} (`python -m anjax.report ab --out OUT` redoes them).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from anjax.eval import provenance
from anjax.train import ab

ROOT = Path(__file__).resolve().parents[1]


def parse_arm(text: str) -> tuple[str, list[str]]:
    """'name=a.b=1,c.d=2' -> ('name', ['a.b=1', 'c.d=2']); 'name=' has no overrides. A comma starts a new
    override only before `key.path=`, so values may hold commas (`anchors.tokens=[".", ","]`)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name:
        raise SystemExit(f"error: --arm expects NAME=key=value,key=value (or NAME=), got {text!r}")
    return name, [o for o in re.split(r",(?=[\w.]+=)", rest) if o]


def run_arms(config: str, arms: dict[str, list[str]], out: Path, seconds: float, common: list[str]) -> None:
    """Start every arm's train.py, SIGTERM all of them after `seconds`, wait for their checkpoints."""
    procs = {}
    for name, overrides in arms.items():
        out.mkdir(parents=True, exist_ok=True)  # OUT/NAME is train.py's: it refuses a folder it did not make
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            config,
            "--set",
            f"run.dir={out / name}",
            *common,
            *overrides,
        ]
        log = (out / f"{name}.log").open("a")
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"[ab] {name}: {' '.join(cmd[2:])}", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(5)
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for name, p in procs.items():
        if p.wait() != 0:
            print(f"[ab] {name} exited with {p.returncode}: see {out / f'{name}.log'}", flush=True)


def run_sequentially(
    config: str, arms: dict[str, list[str]], out: Path, seconds: float, common: list[str]
) -> Iterator[str]:
    """Each arm's train.py in turn (a finished arm's resume ends at once), each stopped after `seconds`; yields
    each arm's name once its run ended."""
    for name, overrides in arms.items():
        run_arms(config, {name: overrides}, out, seconds, common)
        yield name


def measure(out: Path, name: str, ppl_args: str) -> None:
    """OUT/NAME.ppl.json: the arm's held-out text perplexity (full and anchor cache) at its last checkpoint, once
    the arm reached its last step."""
    run_dir, report = out / name, out / f"{name}.ppl.json"
    config = run_dir / "config.yaml"
    if report.exists() or not config.is_file() or not (run_dir / "metrics.jsonl").is_file():
        return
    steps = yaml.safe_load(config.read_text())["train"]["steps"]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    if last < steps:
        return
    cmd = [sys.executable, "-m", "anjax.evaluate", "--perplexity", "--model", str(run_dir), "--cache", "full,anchor"]
    cmd += [*shlex.split(ppl_args), "--out-dir", str(out), "--name", f"{name}.ppl"]
    print(f"[ab] {name}: {shlex.join(cmd[1:])}", flush=True)
    with (out / f"{name}.log").open("a") as log:
        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            print(f"[ab] {name}: the perplexity run failed: see {out / f'{name}.log'}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the YAML config every arm starts from")
    p.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=OVERRIDES",
        help="an arm: NAME=key=value,key=value (NAME= for the config as is); repeatable",
    )
    p.add_argument(
        "--seconds", type=float, default=1800, help="wall-clock budget of the side-by-side run (of each arm in turn)"
    )
    p.add_argument(
        "--sequential", action="store_true", help="run the arms one after another and compare them at equal steps"
    )
    p.add_argument("--out", default="runs/ab", help="one run directory per arm below this")
    p.add_argument("--set", dest="common", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    p.add_argument("--report-only", action="store_true", help="only summarize existing runs")
    p.add_argument(
        "--ppl",
        default=None,
        metavar="ARGS",
        help="measure each finished arm's held-out text perplexity with these `anjax.evaluate --perplexity` arguments",
    )
    prov = provenance.begin("benchmarks/ab_objectives.py", argv)
    args = p.parse_args(argv)
    arms = dict(parse_arm(a) for a in args.arm)
    if len(arms) != len(args.arm):
        raise SystemExit("error: two arms share a name")
    if args.seconds <= 0:
        raise SystemExit("error: --seconds must be > 0")
    if not Path(args.config).is_file():
        raise SystemExit(f"error: config {args.config} does not exist")
    out = Path(args.out)
    if not args.report_only:
        if args.sequential:
            for name in run_sequentially(args.config, arms, out, args.seconds, args.common):
                if args.ppl is not None:
                    measure(out, name, args.ppl)
        else:
            run_arms(args.config, arms, out, args.seconds, args.common)
    if args.ppl is not None and not args.report_only:  # arms run side by side, or finished before --ppl was given
        for name in arms:
            measure(out, name, args.ppl)
    clock = "step" if args.sequential else "train_s"
    meta = dict(config=args.config, arms=arms, seconds=args.seconds, provenance=prov.finish())
    ab.write_report(out, list(arms), clock, **meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
