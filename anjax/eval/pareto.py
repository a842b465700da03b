"""Quality against KV kept, every method of every model on one figure, and which points are Pareto-optimal
(`python -m anjax.report pareto`).

A model contributes an `anjax.evaluate` report of the multiple-choice tasks (the anchor cache, training-free
SepLLM and the policies at their budgets: `python -m anjax.report policies`) and, optionally, a perplexity
report of the same caches (`python -m anjax.evaluate --perplexity`). Each cache is a point: accuracy averaged
over the tasks (95% interval) against the KV kept (1 − C↓ averaged over the tasks), and the perplexity over the
full cache's (95% interval) against the KV kept on the held-out text. A point is on the front when no other
point of its model keeps no more KV and scores at least as well, one of the two strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

from anjax.eval import compare, policy_report

METRICS = {"acc": "accuracy (%), avg over tasks", "ppl_ratio": "perplexity / full-cache perplexity"}


def load_perplexity(path: Path) -> dict:
    """The perplexity part of an `anjax.evaluate --perplexity` (or quality) report in `path`."""
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a JSON report") from None
    rep = rep.get("perplexity", rep) if isinstance(rep, dict) else {}
    if not isinstance(rep, dict) or "results" not in rep or "ratios" not in rep:
        raise ValueError(f"{path}: not an anjax.evaluate --perplexity report")
    return rep


def points(accuracy: dict, perplexity: dict | None = None) -> dict[str, list[dict]]:
    """{"acc": [...], "ppl_ratio": [...]}: one point per cache {cache, method, budget, kept, value, ci} of one
    model's reports (the full cache's perplexity ratio is 1), each marked `front`."""
    out = {"acc": [], "ppl_ratio": []}
    for name, r in policy_report.summary(accuracy).items():
        out["acc"].append(_point(name, r["kept"], r["acc"], r["acc_ci"]))
    if perplexity is not None:
        for name, r in perplexity["results"].items():
            ratio = perplexity["ratios"].get(f"{name} / full", {"ppl_ratio": 1.0, "ppl_ratio_ci": [1.0, 1.0]})
            out["ppl_ratio"].append(_point(name, 1 - r["c_reduction"], ratio["ppl_ratio"], ratio["ppl_ratio_ci"]))
    for metric, pts in out.items():
        better = (lambda a, b: a > b) if metric == "acc" else (lambda a, b: a < b)
        for p in pts:
            p["front"] = not any(
                q is not p
                and q["kept"] <= p["kept"]
                and not better(p["value"], q["value"])
                and (q["kept"] < p["kept"] or better(q["value"], p["value"]))
                for q in pts
            )
    return out


def _point(name: str, kept: float, value: float, ci) -> dict:
    method, _, budget = name.partition("@")
    return {"cache": name, "method": method, "budget": budget or "own", "kept": kept, "value": value, "ci": list(ci)}


def markdown(models: dict[str, dict[str, list[dict]]]) -> str:
    lines = []
    for model, by_metric in models.items():
        for metric, pts in by_metric.items():
            if not pts:
                continue
            fmt = (lambda x: f"{100 * x:.1f}") if metric == "acc" else (lambda x: f"{x:.3f}")
            lines += [
                f"## {model}: {METRICS[metric]}",
                "",
                "| cache | budget | KV kept | value [95% interval] | front |",
            ]
            lines.append("|---|---|---|---|---|")
            for p in sorted(pts, key=lambda p: p["kept"]):
                value = f"{fmt(p['value'])} [{fmt(p['ci'][0])}, {fmt(p['ci'][1])}]"
                front = "yes" if p["front"] else ""
                lines.append(f"| {p['method']} | {p['budget']} | {100 * p['kept']:.1f}% | {value} | {front} |")
            lines.append("")
    return "\n".join(lines)


def plot(models: dict[str, dict[str, list[dict]]], path) -> None:
    """One column per metric, every model's points on it (a marker per model, a colour per method), each model's
    front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(by[m] for by in models.values())]
    methods = sorted({p["method"] for by in models.values() for pts in by.values() for p in pts})
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        scale = 100 if metric == "acc" else 1
        for k, (model, by_metric) in enumerate(models.items()):
            marker, pts = "os^Dv"[k % 5], by_metric[metric]
            for p in pts:
                err = [[scale * (p["value"] - p["ci"][0])], [scale * (p["ci"][1] - p["value"])]]
                ax.errorbar(
                    [p["kept"]],
                    [scale * p["value"]],
                    yerr=err,
                    fmt=marker,
                    color=colour[p["method"]],
                    alpha=0.85,
                    capsize=2,
                    markersize=6,
                )
            front = sorted((p["kept"], scale * p["value"]) for p in pts if p["front"])
            if front:
                ax.step(
                    *zip(*front),
                    where="post",
                    color="k",
                    ls=["-", "--", ":", "-."][k % 4],
                    lw=1,
                    label=f"{model}: front",
                )
        for k, model in enumerate(models):
            ax.plot([], [], "os^Dv"[k % 5], color="gray", label=model)
        for m in methods:
            ax.plot([], [], "o", color=colour[m], label=m)
        ax.set_xlabel("KV kept (fraction of the context)")
        ax.set_ylabel(f"{METRICS[metric]}, 95% intervals")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(spec: str) -> tuple[str, dict, dict | None]:
    """'NAME=EVAL.json[,PPL.json]' -> (NAME, accuracy report, perplexity report or None); EVAL may be
    A.json+B.json, one model's reports merged (`anjax.eval.compare.load_reports`)."""
    name, sep, files = spec.partition("=")
    parts = [f for f in files.split(",") if f]
    if not sep or not name or not 1 <= len(parts) <= 2:
        raise ValueError(f"--model expects NAME=EVAL.json[,PERPLEXITY.json], got {spec!r}")
    return name, compare.load_reports(parts[0]), load_perplexity(Path(parts[1])) if len(parts) == 2 else None
