"""Accuracy against KV budget: the anchor cache and the training-free policies at equal budgets.

    python benchmarks/policies_report.py --model runs/main-job/hf --limit 200      # evaluate, then report
    python benchmarks/policies_report.py --reports benchmarks/results/a.json b.json  # report existing runs

With --model (default: the embedded SmolLM2, anchors "ep"), runs `python -m anjax.evaluate --cache
full,anchor,sepllm,window,snapkv,h2o --budget match-anchor,FRACTIONS --sepllm-window N` (same documents,
interleaved paths, bootstrap intervals; resumable: rerun the same command after a kill) and writes its report
OUT_DIR/NAME_eval.{json,md,png}. Then, for that run and every --reports JSON (one panel per model): the
accuracy averaged over the tasks (95% interval) against the KV budget fraction actually kept (1 − C↓
averaged over the tasks), one line per policy, the anchor cache and training-free SepLLM (each at its own
budget) as one point each and the full cache as the level at 1 -> OUT_DIR/NAME.{md,json,png}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anjax import cli  # noqa: E402
from anjax.cli import evaluate as evaluate_cli  # noqa: E402
from anjax.eval import evaluate, provenance, stats  # noqa: E402
from anjax.inference.policies import POLICIES  # noqa: E402
from anjax.io import outputs  # noqa: E402


def summary(report: dict) -> dict:
    """{cache name: {acc, acc_ci, kept, t_vs_full[, minus_anchor, minus_anchor_ci]}} of one evaluate report,
    averaged over its tasks; `minus_anchor`: a policy at the anchor's budgets − anchor, paired per document."""
    tasks = list(report["tasks"])
    boot = report["bootstrap"]
    per_doc = lambda name: [np.asarray(report["tasks"][t][name]["acc_per_doc"], float) for t in tasks]
    out = {}
    for name in report["caches"]:
        rows = [report["tasks"][t][name] for t in tasks]
        t_full = [r.get("t_vs_full") for r in rows]
        out[name] = {
            "acc": report["average"][name]["acc"],
            "acc_ci": report["average"][name]["acc_ci"],
            "kept": 1 - sum(r["c_reduction"] for r in rows) / len(rows),
            "t_vs_full": None if None in t_full else sum(t_full) / len(t_full),
        }
        if name.endswith(f"@{evaluate.MATCH_ANCHOR}") and "anchor" in report["caches"]:
            deltas = [a - b for a, b in zip(per_doc(name), per_doc("anchor"))]
            d = stats.task_average_ci(deltas, samples=boot["samples"], seed=boot["seed"], level=boot["level"])
            out[name].update(minus_anchor=d.estimate, minus_anchor_ci=d.as_list())
    return out


def markdown(models: dict[str, dict], reports: dict[str, dict]) -> str:
    lines = []
    for model, rows in models.items():
        rep = reports[model]
        lines += [
            f"## {model}",
            "",
            f"{len(rep['tasks'])} tasks × ≤{rep['limit']} docs, {rep['shots']}-shot, anchors {rep['anchor_mode']}; "
            "avg acc (%) over the tasks [95% interval] / KV kept (% of the context) / T↑ vs full cache",
            "",
            "| cache | budget | avg acc | kept | T↑ vs full | − anchor (paired) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            cache, _, budget = name.partition("@")
            t = "–" if r["t_vs_full"] is None else f"{r['t_vs_full']:.2f}×"
            acc = f"{100 * r['acc']:.1f} [{100 * r['acc_ci'][0]:.1f}, {100 * r['acc_ci'][1]:.1f}]"
            diff = "–"
            if "minus_anchor" in r:
                lo, hi = (100 * x for x in r["minus_anchor_ci"])
                diff = f"{100 * r['minus_anchor']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            lines.append(f"| {cache} | {budget or 'own'} | {acc} | {100 * r['kept']:.1f}% | {t} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def _point(ax, r: dict, **kw) -> None:
    """One accuracy at its kept fraction, with its 95% interval."""
    err = [[100 * (r["acc"] - r["acc_ci"][0])], [100 * (r["acc_ci"][1] - r["acc"])]]
    ax.errorbar([r["kept"]], [100 * r["acc"]], yerr=err, capsize=3, **kw)


def plot(models: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, (model, rows) in zip(axes[0], models.items()):
        for i, policy in enumerate(POLICIES):
            pts = sorted((r["kept"], 100 * r["acc"]) for n, r in rows.items() if n.startswith(f"{policy}@"))
            if pts:
                ax.plot(*zip(*pts), "-" + "os^"[i % 3], color=f"C{i}", label=policy, alpha=0.8)
                for n, r in rows.items():
                    if n.startswith(f"{policy}@"):
                        _point(ax, r, color=f"C{i}", fmt="none", alpha=0.5)
        if "anchor" in rows:
            _point(ax, rows["anchor"], color="k", fmt="*", markersize=12, label="anchor (own budget)")
        if "sepllm" in rows:
            _point(ax, rows["sepllm"], color="C4", fmt="D", markersize=8, label="SepLLM, training-free (own budget)")
        if "full" in rows:
            ax.axhline(100 * rows["full"]["acc"], color="gray", ls="--", label="full cache")
        ax.set_xlabel("KV budget kept (fraction of the context, avg over tasks)")
        ax.set_ylabel("accuracy (%), avg over tasks, 95% intervals")
        ax.set_title(model)
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python benchmarks/policies_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="evaluate this model first (HF dir, GGUF, anjax run; default SmolLM2)")
    p.add_argument("--reports", nargs="*", default=[], help="existing evaluate JSON reports to include")
    p.add_argument("--no-run", action="store_true", help="only report --reports (evaluate nothing)")
    p.add_argument("--tasks", default=",".join(evaluate.DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=200, help="first N documents per task")
    p.add_argument("--budget", default="match-anchor,0.05,0.1,0.2,0.5", help="--budget of anjax.evaluate")
    p.add_argument("--anchor-mode", default=None, choices=("ep", "ac"), help="default: the model's, else ep")
    p.add_argument("--sepllm-window", type=int, default=64, help="training-free SepLLM's neighbouring tokens")
    p.add_argument("--no-sepllm", action="store_true", help="leave out the SepLLM row (an AC model: it reads <AC>)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="policies")
    prov = provenance.begin("python benchmarks/policies_report.py", argv)
    args = p.parse_args(argv)
    paths = [Path(r) for r in args.reports]
    if args.no_run and not paths:
        p.error("nothing to report: give --reports or leave out --no-run")
    cli.check_range("--limit", args.limit, 1)
    for path in paths:
        if not path.is_file():
            p.error(f"--reports: no such file {path}")
    if not args.no_run:
        anchor_mode = args.anchor_mode or ("ep" if args.model is None else None)
        sepllm = [] if args.no_sepllm else ["sepllm"]
        argv_eval = ["--cache", ",".join(["full", "anchor", *sepllm, "window", "snapkv", "h2o"])]
        argv_eval += ["--budget", args.budget, "--tasks", args.tasks, "--sepllm-window", str(args.sepllm_window)]
        argv_eval += ["--limit", str(args.limit), "--out-dir", args.out_dir, "--name", f"{args.name}_eval"]
        argv_eval += [] if args.model is None else ["--model", args.model]
        argv_eval += [] if anchor_mode is None else ["--anchor-mode", anchor_mode]
        print("python -m anjax.evaluate " + " ".join(argv_eval), flush=True)
        evaluate_cli.main(argv_eval)
        paths.insert(0, Path(args.out_dir) / f"{args.name}_eval.json")
    reports = {}
    for path in paths:
        rep = json.loads(path.read_text())
        reports[f"{rep['model']} ({path.stem})"] = rep
    models = {m: summary(r) for m, r in reports.items()}
    text = markdown(models, reports)
    print(text)
    sources = {m: r.get("provenance") for m, r in reports.items()}
    data = {"models": models, "provenance": prov.finish(sources=sources)}
    outputs.write_report(args.out_dir, args.name, text, data, lambda d, path: plot(d["models"], path))
    print(f"wrote {Path(args.out_dir) / args.name}.md, .json, .png")
    return 0


if __name__ == "__main__":
    cli.run(main)
