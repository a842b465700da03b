"""Issue #35 after its A/B: the winning arm trained at the long recipe's budget, then every table the issue
closes with. One command for every sitting; each stage resumes where the last sitting stopped.

    python benchmarks/window_long.py              # every stage (resumable: rerun it)
    python benchmarks/window_long.py --dry-run    # the winner and the commands, nothing run

Stages (each command is printed before it runs, so any one can be rerun by hand):
  winner    the arm of the A/B report (benchmarks/ab_window.sh; --ab) with the lowest held-out perplexity on text
            in its own anchor cache, refused until every arm reached the last step and was measured there
            (`anjax.train.ab.winner`); never chosen on the tasks
  train     python train.py --config <the A/B's config> --set run.dir=RUN <the arm's overrides>: the long
            recipe's budget (its steps, schedule, validation, checkpoints and export), resumed by a rerun; a
            fresh RUN starts from a copy of the arm's prepared corpus when the A/B's run is on this machine
  base      training-free SepLLM on the base model, on the documents of the base model's committed table
            (`--cache full,sepllm`, merged with that report by `+`; the task store resumes it)
  policies  the trained model against every training-free policy at equal budgets, 8 tasks x 200 documents
            (`python -m anjax.report policies`, resumed task by task), beside the base model's table
  ppl       held-out perplexity at --policy-chunk 1 (eviction after every token), every cache at the
            anchor cache's budgets and at 0.1, the trained model and the base model (skipped once written)
  compare   the trained model's caches against the base model's, with and without boolq
  pareto    accuracy and perplexity against KV kept, both models, every method
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from anjax import cli
from anjax.io import outputs
from anjax.train import ab

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
BASE_EVAL = f"{RESULTS}/policies_smollm2_eval.json"  # the base model's 8 tasks x 200 documents, every policy
BASE_SEPLLM = f"{RESULTS}/policies_smollm2_sepllm_eval.json"
TASKS_NO_BOOLQ = "arc_easy,arc_challenge,hellaswag,obqa,piqa,sciq,winogrande"
PPL = (
    "--perplexity --ppl-data embedded --batch-size 16 --policy-chunk 1 --cache full,anchor,sepllm,window,snapkv,h2o "
    "--budget match-anchor,0.1"
)


def stages(winner: str, arms: dict[str, list[str]], config: str, run: str) -> list[tuple[str, list[str], str | None]]:
    """[(stage, argv after `python`, the output that marks it done or None: always run)] in order."""
    tag = f"anllm_{winner.replace('-', '_')}_long"
    export, policies = f"{run}/export", f"{RESULTS}/policies_{tag}_eval.json"
    ppl_new, ppl_base = f"{RESULTS}/ppl_policies_{tag}_chunk1", f"{RESULTS}/ppl_policies_smollm2_chunk1"
    base = f"{BASE_EVAL}+{BASE_SEPLLM}"
    compare = f"-m anjax.report compare --new {policies} --base {base} --name compare_{tag}_vs_base"
    return [
        ("train", ["train.py", "--config", config, "--set", f"run.dir={run}", *arms[winner]], f"{export}/config.json"),
        ("base", f"-m anjax.evaluate --cache full,sepllm --anchor-mode ep --limit 200 --no-timing --out-dir {RESULTS} "
                 f"--name {Path(BASE_SEPLLM).stem}".split(), None),
        ("policies", f"-m anjax.report policies --model {export} --limit 200 --no-timing --name policies_{tag} "
                     f"--reports {base}".split(), None),
        ("ppl", f"-m anjax.evaluate {PPL} --model {export} --out-dir {RESULTS} --name {Path(ppl_new).name}".split(),
         f"{ppl_new}.json"),
        ("ppl", f"-m anjax.evaluate {PPL} --anchor-mode ep --out-dir {RESULTS} --name {Path(ppl_base).name}".split(),
         f"{ppl_base}.json"),
        ("compare", compare.split(), None),
        ("compare", f"{compare}_no_boolq --tasks {TASKS_NO_BOOLQ}".split(), None),
        ("pareto", f"-m anjax.report pareto --model AnLLM-{winner}={policies},{ppl_new}.json "
                   f"--model SmolLM2-135M-Instruct-EP={base},{ppl_base}.json --name pareto_{tag}".split(), None),
    ]  # fmt: skip


def seed_corpus(ab_out: Path, winner: str, run: Path) -> None:
    """A fresh RUN starts from the arm's prepared corpus (the same plan: same data, tokenizer and scheme), so the
    long run does not encode it again; what RUN already holds is never touched."""
    source = ab_out / winner / "data"
    if source.is_dir() and not run.exists():
        print(f"[long] {run}/data: a copy of {source} (the arm's prepared corpus)", flush=True)
        outputs.claim_run_dir(run)  # train.py's run directory, as train.py makes it
        shutil.copytree(source, run / "data")


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="benchmarks/window_long.py", description=__doc__.splitlines()[0])
    p.add_argument("--ab", default=f"{RESULTS}/ab_window/ab.json", help="the finished A/B's report (ab.json)")
    p.add_argument("--ab-out", default="runs/ab-window", help="the A/B's run directories (for the arm's corpus)")
    p.add_argument("--run", default=None, help="the long run's directory (default runs/anllm-<winner>-long)")
    p.add_argument("--from", dest="first", default="train", help="skip the stages before this one")
    p.add_argument("--dry-run", action="store_true", help="print the winner and the commands, run nothing")
    args = p.parse_args(argv)
    path = Path(args.ab)
    if not path.is_file():
        raise cli.UsageError(f"--ab {path}: no such file (finish the A/B first: benchmarks/ab_window.sh)")
    report = json.loads(path.read_text())
    if not isinstance(report.get("arms"), dict) or "config" not in report:
        raise cli.UsageError(f"--ab {path}: not a report of benchmarks/ab_objectives.py (it names the arms' overrides)")
    try:
        winner = ab.winner(report["rows"], list(report["arms"]))
    except ValueError as e:
        raise cli.UsageError(f"{path}: {e}") from None
    run = args.run or f"runs/anllm-{winner}-long"
    plan = stages(winner, report["arms"], report["config"], run)
    names = [name for name, _, _ in plan]
    if args.first not in names:
        raise cli.UsageError(f"--from {args.first!r}: one of {', '.join(dict.fromkeys(names))}")
    row = next(r for r in report["rows"] if r["arm"] == winner)
    print(
        f"[long] winner of {path}: {winner} (held-out text perplexity in its anchor cache {row['ppl_anchor']:.2f}, "
        f"{100 * row['kept']:.1f}% of the KV kept, step {row['step']})"
    )
    for name, cmd, done in plan[names.index(args.first) :]:
        line = shlex.join(cmd)
        if done is not None and (ROOT / done).exists():
            print(f"[long] {name}: done ({done})", flush=True)
            continue
        print(f"[long] {name}: python {line}", flush=True)
        if args.dry_run:
            continue
        if name == "train":
            seed_corpus(ROOT / args.ab_out, winner, ROOT / run)
        if subprocess.run([sys.executable, *cmd], cwd=ROOT).returncode != 0:
            raise ValueError(f"stage {name} failed (a rerun resumes it): python {line}")
    return 0


if __name__ == "__main__":
    cli.run(main)
