"""`python -m anjax.report REPORT ...`: reports read models or result files and write OUT_DIR/NAME.{md,json,png}.

    python -m anjax.report quality --model runs/main-job/hf --limit 200     # 8 tasks, full vs anchor, + perplexity
    python -m anjax.report policies --model runs/main-job/hf --limit 200    # accuracy vs KV budget, every policy
    python -m anjax.report compare --new A.json --base B.json               # paired differences, two models
    python -m anjax.report curve --run runs/smollm2-135m-ac-long           # held-out loss curve and its trend
    python -m anjax.report ab --out runs/ab                                 # A/B arms at equal wall-clock
    python -m anjax.report pareto --model AC=EVAL.json,PPL.json --model base=...  # quality vs KV kept, fronts

`python -m anjax.report REPORT --help` lists each report's flags. Every JSON carries its provenance.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from anjax import cli
from anjax.cli import evaluate as evaluate_cli
from anjax.cli import quality
from anjax.eval import compare, evaluate, pareto, policy_report, provenance
from anjax.io import outputs
from anjax.train import ab, curves

PROG = "python -m anjax.report"


def load_reports(spec: str, option: str) -> dict:
    """An evaluate report, or several of one model merged (`anjax.eval.compare.load_reports`); UsageError naming
    `option` when it cannot be read or merged."""
    try:
        return compare.load_reports(spec)
    except ValueError as e:
        raise cli.UsageError(f"{option}: {e}") from None


def policies(argv: list[str]) -> int:
    """Evaluate a model with the anchor cache and every policy at equal budgets (`anjax.evaluate`, resumable),
    then plot accuracy against the KV kept for it and every --reports JSON (one panel per model)."""
    p = cli.ArgumentParser(prog=f"{PROG} policies", description=cli.summary(policy_report.__doc__, paragraph=True))
    p.add_argument("--model", default=None, help="evaluate this model first (HF dir, GGUF, anjax run; default SmolLM2)")
    p.add_argument(
        "--reports",
        nargs="*",
        default=[],
        help="existing evaluate JSON reports to include (A.json+B.json: one model's reports merged, e.g. a cache "
        "evaluated later)",
    )
    p.add_argument("--no-run", action="store_true", help="only report --reports (evaluate nothing)")
    p.add_argument("--tasks", default=",".join(evaluate.DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=200, help="first N documents per task")
    p.add_argument("--budget", default="match-anchor,0.05,0.1,0.2,0.5", help="--budget of anjax.evaluate")
    p.add_argument("--anchor-mode", default=None, choices=("ep", "ac"), help="default: the model's, else ep")
    p.add_argument("--sepllm-window", type=int, default=64, help="training-free SepLLM's neighbouring tokens")
    p.add_argument("--no-sepllm", action="store_true", help="leave out the SepLLM row (an AC model: it reads <AC>)")
    p.add_argument("--no-timing", action="store_true", help="no T↑ column: skip the extra paths that time it")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="policies")
    prov = provenance.begin(f"{PROG} policies", argv)
    args = p.parse_args(argv)
    if args.no_run and not args.reports:
        p.error("nothing to report: give --reports or leave out --no-run")
    cli.check_range("--limit", args.limit, 1)
    given = {spec: load_reports(spec, "--reports") for spec in args.reports}
    if not args.no_run:
        anchor_mode = args.anchor_mode or ("ep" if args.model is None else None)
        sepllm = [] if args.no_sepllm else ["sepllm"]
        argv_eval = ["--cache", ",".join(["full", "anchor", *sepllm, "window", "snapkv", "h2o"])]
        argv_eval += ["--budget", args.budget, "--tasks", args.tasks, "--sepllm-window", str(args.sepllm_window)]
        argv_eval += ["--limit", str(args.limit), "--out-dir", args.out_dir, "--name", f"{args.name}_eval"]
        argv_eval += [] if args.model is None else ["--model", args.model]
        argv_eval += [] if anchor_mode is None else ["--anchor-mode", anchor_mode]
        argv_eval += ["--no-timing"] if args.no_timing else []
        print("python -m anjax.evaluate " + " ".join(argv_eval), flush=True)
        evaluate_cli.main(argv_eval)
        path = Path(args.out_dir) / f"{args.name}_eval.json"
        given = {str(path): compare.load_report(path), **given}
    reports = {}
    for spec, rep in given.items():
        reports[f"{rep['model']} ({'+'.join(Path(s).stem for s in spec.split('+'))})"] = rep
    models = {m: policy_report.summary(r) for m, r in reports.items()}
    text = policy_report.markdown(models, reports)
    print(text)
    sources = {m: r.get("provenance") for m, r in reports.items()}
    data = {"models": models, "provenance": prov.finish(sources=sources)}
    outputs.write_report(args.out_dir, args.name, text, data, lambda d, path: policy_report.plot(d["models"], path))
    print(f"wrote {Path(args.out_dir) / args.name}.md, .json, .png")
    return 0


def compare_models(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog=f"{PROG} compare", description=cli.summary(compare.__doc__, paragraph=True))
    p.add_argument(
        "--new", required=True, help="report JSON of the new (trained) model (A.json+B.json: its reports merged)"
    )
    p.add_argument(
        "--base", required=True, help="report JSON of the base model, same tasks and documents (A.json+B.json: merged)"
    )
    p.add_argument("--pairs", default=",".join(compare.PAIRS), help="comma list of NEWCACHE-BASECACHE")
    p.add_argument("--tasks", default=None, help="comma list: only these tasks (default: all both reports hold)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="compare_models")
    prov = provenance.begin(f"{PROG} compare", argv)
    args = p.parse_args(argv)
    pairs = [tuple(x.split("-", 1)) for x in args.pairs.split(",") if x]
    if not pairs or any(len(x) != 2 or not all(x) for x in pairs):
        p.error(f"--pairs expects NEWCACHE-BASECACHE[,...], got {args.pairs!r}")
    new, base = load_reports(args.new, "--new"), load_reports(args.base, "--base")
    cli.check_writable_dir(args.out_dir, "--out-dir")
    diffs = compare.paired(new, base, pairs, None if args.tasks is None else args.tasks.split(","))
    text = compare.markdown(new, base, diffs)
    print(text)
    data = dict(new=new["model"], base=base["model"], metric="acc", differences=diffs)
    data["provenance"] = prov.finish(sources={"new": new.get("provenance"), "base": base.get("provenance")})
    outputs.write_report(args.out_dir, args.name, text, data, compare.plot)
    print(f"wrote {Path(args.out_dir) / args.name}.md, .json, .png")
    return 0


def curve(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog=f"{PROG} curve", description=cli.summary(curves.__doc__, paragraph=True))
    p.add_argument("--run", required=True, help="a train.py run directory (metrics.jsonl, config.yaml)")
    p.add_argument("--from-step", type=int, default=50, help="first step of the whole-run fit")
    p.add_argument("--tail", type=int, default=4, help="evaluations in the tail fit")
    p.add_argument("--target", type=float, default=1.10, help="target anchor / full perplexity ratio")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="long_run_curve")
    args = p.parse_args(argv)
    run = Path(args.run)
    for f in ("metrics.jsonl", "config.yaml"):
        cli.check_readable_file(run / f, "--run:")
    cli.check_writable_dir(args.out_dir, "--out-dir")
    cli.check_range("--tail", args.tail, 2)
    if not args.target > 1:
        p.error(f"--target must be > 1, got {args.target}")
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    rows = curves.validation_rows(run / "metrics.jsonl", int(data["batch_size"]) * int(data["seq_len"]))
    rep = curves.report(rows, args.from_step, args.tail, args.target, str(run))
    text = curves.markdown(rep)
    print(text)
    outputs.write_report(args.out_dir, args.name, text, rep, curves.plot)
    print(f"wrote {Path(args.out_dir) / args.name}.md, .json, .png")
    return 0


def ab_arms(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog=f"{PROG} ab", description=cli.summary(ab.__doc__, paragraph=True))
    p.add_argument("--out", default="runs/ab", help="the A/B's directory: one run directory per arm below it")
    p.add_argument(
        "--arm",
        action="append",
        default=None,
        metavar="NAME",
        help="an arm to include (NAME or NAME=OVERRIDES as benchmarks/ab_objectives.py takes it; repeatable; "
        "default: every directory of --out holding a metrics.jsonl)",
    )
    p.add_argument(
        "--clock",
        choices=ab.CLOCKS,
        default="train_s",
        help="compare at the common end of training seconds (arms run side by side) or of steps (one after another)",
    )
    prov = provenance.begin(f"{PROG} ab", argv)
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        p.error(f"--out {out}: no such directory")
    names = [a.partition("=")[0] for a in args.arm] if args.arm else None
    names = names or sorted(d.name for d in out.iterdir() if (d / "metrics.jsonl").is_file())
    if not names:
        p.error(f"--out {out}: no arm (a directory holding metrics.jsonl) below it")
    ab.write_report(out, names, args.clock, arms=names, provenance=prov.finish())
    return 0


def pareto_front(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog=f"{PROG} pareto", description=cli.summary(pareto.__doc__, paragraph=True))
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=EVAL[,PPL]",
        help="a model: its `anjax.evaluate` report of the tasks (policies at their budgets) and optionally its "
        "perplexity report of the same caches (repeatable)",
    )
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="pareto")
    prov = provenance.begin(f"{PROG} pareto", argv)
    args = p.parse_args(argv)
    loaded = [pareto.load(spec) for spec in args.model]
    if len({name for name, _, _ in loaded}) != len(loaded):
        p.error("two --model share a name")
    cli.check_writable_dir(args.out_dir, "--out-dir")
    models = {name: pareto.points(acc, ppl) for name, acc, ppl in loaded}
    text = pareto.markdown(models)
    print(text)
    sources = {
        name: {"accuracy": acc.get("provenance"), "perplexity": (ppl or {}).get("provenance")}
        for name, acc, ppl in loaded
    }
    data = {"models": models, "provenance": prov.finish(sources=sources)}
    outputs.write_report(args.out_dir, args.name, text, data, lambda d, path: pareto.plot(d["models"], path))
    print(f"wrote {Path(args.out_dir) / args.name}.md, .json, .png")
    return 0


REPORTS = {
    "quality": quality.main,
    "policies": policies,
    "compare": compare_models,
    "curve": curve,
    "ab": ab_arms,
    "pareto": pareto_front,
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print((__doc__ or "").strip())
        return 0
    if not argv or argv[0] not in REPORTS:
        given = f"unknown report {argv[0]!r}" if argv else "name a report"
        raise cli.UsageError(f"{given}: one of {', '.join(REPORTS)} (see {PROG} --help)")
    return REPORTS[argv[0]](argv[1:])
