"""Accuracy against KV budget: the anchor cache and the training-free policies at equal budgets, from
`anjax.evaluate` reports (`python -m anjax.report policies`).

Per report (one model): the accuracy averaged over the tasks (95% interval) against the KV budget fraction
actually kept (1 − C↓ averaged over the tasks), one line per policy, the anchor cache and training-free
SepLLM (each at its own budget) as one point each, the full cache as the level at 1; a policy at the
anchor's per-document budgets minus the anchor, paired per document.
"""

from __future__ import annotations

import numpy as np

from anjax.eval import evaluate, stats
from anjax.inference.policies import POLICIES


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
