"""Paired accuracy differences between two models scored on the same documents (`python -m anjax.report compare`).

Both reports are `anjax.evaluate` reports (or quality reports, whose "accuracy" holds one) over the same tasks
and documents (checked by document id). For every (new cache, base cache) pair — by default new full − base
full (forgetting), new anchor − base full (the cost of the anchor cache against the model one started from)
and new anchor − base anchor (what training bought) — the per-task paired difference and the task average
with bootstrap intervals (`anjax.eval.stats`: documents resampled within each task, one resample for both).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from anjax.eval import intervals, stats
from anjax.text.anchors import AnchorScheme

PAIRS = ("full-full", "anchor-full", "anchor-anchor")


def load_report(path: Path) -> dict:
    """The evaluate report in `path` (a quality report's "accuracy" part)."""
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON report (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not a JSON report ({e.msg} at line {e.lineno}, column {e.colno}; truncated?)"
        ) from None
    rep = rep.get("accuracy", rep) if isinstance(rep, dict) else {}
    if "tasks" not in rep or "caches" not in rep:
        raise ValueError(f"{path}: not an anjax.evaluate or quality report")
    return rep


# Shared caches of merged reports may disagree on this share of a task's documents: a near-tie can flip
# between CPUs (AMD, Intel); different weights or documents disagree on far more.
MERGE_DISAGREEMENT = 0.01
MERGE_FIELDS = ("model", "shots", "limit", "seed", "anchor_mode")


def load_reports(spec: str) -> dict:
    """`A.json` or `A.json+B.json+...`: one report, or the merge (`merge`) of several of one model."""
    parts = spec.split("+")
    if not all(parts):
        raise ValueError(f"expected REPORT.json or REPORT.json+REPORT.json..., got {spec!r}")
    paths = [Path(part) for part in parts]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"no such file {path}")
    reports = [load_report(path) for path in paths]
    return reports[0] if len(reports) == 1 else merge(reports, [str(p) for p in paths])


def merge(reports: list[dict], names: list[str]) -> dict:
    """One report of the union of the caches of `reports` (e.g. a cache evaluated later beside the others):
    the same model, shots, limit, seed, anchor scheme, tasks and documents, and every cache two reports share
    agreeing per document (but for `MERGE_DISAGREEMENT`); the first report's results of a shared cache are
    kept. ValueError naming what differs."""
    first = reports[0]
    merged = {**first, "caches": [], "tasks": {t: {} for t in first["tasks"]}, "average": {}, "differences": {}}
    for rep, name in zip(reports, names):
        for field in MERGE_FIELDS:
            if rep.get(field) != first.get(field):
                raise ValueError(f"{name}: its {field} {rep.get(field)!r} differs from {first.get(field)!r}")
        if _scheme(rep) != _scheme(first):
            raise ValueError(f"{name}: its anchor scheme {_scheme(rep)} differs from {_scheme(first)}")
        if set(rep["tasks"]) != set(first["tasks"]):
            raise ValueError(f"{name}: tasks {sorted(rep['tasks'])} differ from {sorted(first['tasks'])}")
        for t, rows in rep["tasks"].items():
            ids = first["tasks"][t][first["caches"][0]]["doc_ids"]
            for cache, row in rows.items():
                if row["doc_ids"] != ids:
                    raise ValueError(f"{name}: task {t} scored other documents; merge only the same documents")
                if cache in merged["tasks"][t]:
                    x, y = (np.asarray(r["acc_per_doc"], float) for r in (merged["tasks"][t][cache], row))
                    if np.mean(x != y) > MERGE_DISAGREEMENT:
                        raise ValueError(
                            f"{name}: task {t}, cache {cache}: {int(np.sum(x != y))} of {x.size} documents scored "
                            "differently (other weights?)"
                        )
                else:
                    merged["tasks"][t][cache] = row
        for cache in rep["caches"]:
            if cache not in merged["caches"]:
                merged["caches"].append(cache)
                merged["average"][cache] = rep["average"][cache]
        for diff, value in rep.get("differences", {}).items():
            merged["differences"].setdefault(diff, value)
    merged["wall_seconds"] = sum(r.get("wall_seconds", 0.0) for r in reports)
    merged["merged_from"] = names
    merged["provenance"] = {"merged": [r.get("provenance") for r in reports]}
    return merged


def _scheme(report: dict) -> dict | None:
    """The report's anchor scheme with the fields older reports lack at their defaults."""
    d = report.get("anchor_scheme")
    return None if d is None else AnchorScheme(**{**d, "tokens": tuple(d["tokens"]), "ids": tuple(d["ids"])}).to_dict()


def paired(new: dict, base: dict, pairs: list[tuple[str, str]], only=None, metric: str = "acc") -> dict:
    """{"NEW - BASE": {"tasks": {t: {diff, ci, n}}, "average": {diff, ci}}} on the tasks both reports hold
    (and `only` names, if given)."""
    tasks = [t for t in new["tasks"] if t in base["tasks"] and (only is None or t in only)]
    if not tasks:
        raise ValueError("the two reports share no task" + ("" if only is None else " of --tasks"))
    for t in tasks:
        a, b = new["tasks"][t], base["tasks"][t]
        ids_a, ids_b = a[new["caches"][0]]["doc_ids"], b[base["caches"][0]]["doc_ids"]
        if ids_a != ids_b:
            raise ValueError(f"task {t}: the reports scored different documents; pair only the same documents")
    boot = dict(samples=new["bootstrap"]["samples"], seed=new["bootstrap"]["seed"], level=new["bootstrap"]["level"])
    out = {}
    for c_new, c_base in pairs:
        for rep, c in ((new, c_new), (base, c_base)):
            if c not in rep["caches"]:
                raise ValueError(f"{rep['model']} has no {c!r} results (it has {', '.join(rep['caches'])})")
        deltas, rows = [], {}
        for t in tasks:
            x = np.asarray(new["tasks"][t][c_new][f"{metric}_per_doc"], float)
            y = np.asarray(base["tasks"][t][c_base][f"{metric}_per_doc"], float)
            d = stats.paired_difference_ci(x, y, **boot)
            rows[t] = dict(diff=d.estimate, ci=d.as_list(), n=int(x.size))
            deltas.append(x - y)
        avg = stats.task_average_ci(deltas, **boot)
        out[f"{c_new} - {c_base}"] = dict(tasks=rows, average=dict(diff=avg.estimate, ci=avg.as_list()))
    return out


def markdown(new: dict, base: dict, diffs: dict) -> str:
    names = list(diffs)
    head = [f"new {n.split(' - ')[0]} − base {n.split(' - ')[1]}" for n in names]
    tasks = list(next(iter(diffs.values()))["tasks"])
    lines = [
        f"Paired accuracy differences (points, 95% bootstrap intervals over documents): new = {new['model']}, "
        f"base = {base['model']}; the same documents, one resample for both",
        "",
        "| task | docs | " + " | ".join(head) + " |",
        "|" + "---|" * (2 + len(names)),
    ]
    for t in tasks:
        cells = [intervals.cell(diffs[n]["tasks"][t]["diff"], diffs[n]["tasks"][t]["ci"], signed=True) for n in names]
        lines.append(f"| {t} | {diffs[names[0]]['tasks'][t]['n']} | " + " | ".join(cells) + " |")
    cells = [intervals.cell(diffs[n]["average"]["diff"], diffs[n]["average"]["ci"], signed=True) for n in names]
    docs = sum(r["n"] for r in diffs[names[0]]["tasks"].values())
    lines.append(f"| average ({len(tasks)} tasks) | {docs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict, path) -> None:
    """One bar per (task, pair) with its 95% interval, the task average last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffs = data["differences"]
    tasks = list(next(iter(diffs.values()))["tasks"]) + ["average"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(diffs)
    for i, (name, d) in enumerate(diffs.items()):
        rows = [d["tasks"][t] for t in tasks[:-1]] + [d["average"]]
        ys = np.array([100 * r["diff"] for r in rows])
        err = np.array([[100 * (r["diff"] - r["ci"][0]), 100 * (r["ci"][1] - r["diff"])] for r in rows]).T
        xs = np.arange(len(tasks)) + (i - (len(diffs) - 1) / 2) * width
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"new {name.replace(' - ', ' − base ')}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy difference (points), 95% intervals")
    ax.set_title(f"new: {data['new']}   base: {data['base']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
